//! A walk over a GGUF header's metadata that finds `general.alignment` before candle's reader
//! divides by it (candle 0.11 panics on an alignment of 0). Anything the walk does not
//! understand ends it quietly: candle's reader then reports the damage in its own words.

use std::io::Read;

/// The `general.alignment` of the GGUF header `r` is positioned at, if the walk finds it as one
/// of the integer types candle reads it from (8 to 32 bits, a negative one counting as absent).
pub fn alignment(r: &mut impl Read) -> Option<u64> {
    let magic = u32_of(r)?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return None;
    }
    let wide = match u32_of(r)? {
        1 => false,
        2 | 3 => true,
        _ => return None,
    };
    let _tensors = len_of(r, wide)?;
    let kvs = len_of(r, wide)?;
    for _ in 0..kvs {
        let key = string_of(r, wide)?;
        let ty = u32_of(r)?;
        if key == b"general.alignment" && ty <= 5 {
            let width = scalar_width(ty)?;
            let mut b = [0u8; 8];
            r.read_exact(&mut b[..width]).ok()?;
            let signed = ty % 2 == 1;
            return (!signed || b[width - 1] < 0x80).then(|| u64::from_le_bytes(b));
        }
        skip_value(r, ty, wide, 0)?;
    }
    None
}

/// Bytes of a scalar GGUF value type (u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64).
fn scalar_width(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn skip_value(r: &mut impl Read, ty: u32, wide: bool, depth: usize) -> Option<()> {
    match ty {
        8 => {
            let n = len_of(r, wide)?;
            skip(r, n)
        }
        9 if depth < 8 => {
            let inner = u32_of(r)?;
            let n = len_of(r, wide)?;
            match scalar_width(inner) {
                Some(w) => skip(r, n.checked_mul(w as u64)?),
                None => (0..n).try_for_each(|_| skip_value(r, inner, wide, depth + 1)),
            }
        }
        _ => skip(r, scalar_width(ty)? as u64),
    }
}

fn skip(r: &mut impl Read, n: u64) -> Option<()> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()?;
    (copied == n).then_some(())
}

fn string_of(r: &mut impl Read, wide: bool) -> Option<Vec<u8>> {
    let n = len_of(r, wide)?;
    // Keys are short; a longer one is damage for candle to report.
    if n > 1 << 16 {
        return None;
    }
    let mut v = vec![0u8; n as usize];
    r.read_exact(&mut v).ok()?;
    Some(v)
}

fn len_of(r: &mut impl Read, wide: bool) -> Option<u64> {
    if wide {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    } else {
        u32_of(r).map(u64::from)
    }
}

fn u32_of(r: &mut impl Read) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header with `general.name = "x"`, an array of two strings, then the alignment.
    fn header(alignment_type: u32, value: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(0x4655_4747u32.to_le_bytes());
        h.extend(3u32.to_le_bytes());
        h.extend(0u64.to_le_bytes());
        h.extend(3u64.to_le_bytes());
        let string = |h: &mut Vec<u8>, s: &str| {
            h.extend((s.len() as u64).to_le_bytes());
            h.extend(s.as_bytes());
        };
        string(&mut h, "general.name");
        h.extend(8u32.to_le_bytes());
        string(&mut h, "x");
        string(&mut h, "tokenizer.ggml.tokens");
        h.extend(9u32.to_le_bytes());
        h.extend(8u32.to_le_bytes());
        h.extend(2u64.to_le_bytes());
        string(&mut h, "a");
        string(&mut h, "bc");
        string(&mut h, "general.alignment");
        h.extend(alignment_type.to_le_bytes());
        h.extend(value);
        h
    }

    #[test]
    fn finds_the_alignment_after_other_values() {
        let h = header(4, &32u32.to_le_bytes());
        assert_eq!(alignment(&mut h.as_slice()), Some(32));
        let h = header(4, &0u32.to_le_bytes());
        assert_eq!(alignment(&mut h.as_slice()), Some(0));
        let h = header(0, &[16]);
        assert_eq!(alignment(&mut h.as_slice()), Some(16));
        // candle ignores a negative or 64-bit alignment, and so does the walk.
        let h = header(5, &(-1i32).to_le_bytes());
        assert_eq!(alignment(&mut h.as_slice()), None);
        let h = header(10, &0u64.to_le_bytes());
        assert_eq!(alignment(&mut h.as_slice()), None);
    }

    #[test]
    fn gives_up_quietly_on_damage() {
        let h = header(4, &32u32.to_le_bytes());
        assert_eq!(alignment(&mut &h[..40]), None);
        assert_eq!(alignment(&mut &b"GGML"[..]), None);
        let h = header(99, &[0; 8]);
        assert_eq!(alignment(&mut h.as_slice()), None);
    }
}
