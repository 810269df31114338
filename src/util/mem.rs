//! How much memory wake2vec may use: the bound it checks sizes from files and flags against
//! before allocating, so that an impossible size is one clear error, not an abort. The bound is
//! the machine's physical memory, or less where `WAKE2VEC_MAX_MEMORY` says (e.g. `8G`, `512M`,
//! or bytes), for a shared machine.

use anyhow::Context;

/// Total physical memory in bytes, if the system says.
pub fn physical_bytes() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads system constants; it has no preconditions.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            return (pages as u64).checked_mul(size as u64);
        }
    }
    None
}

/// `bytes` in GiB with one decimal, for messages.
pub fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The environment variable that lowers the memory bound.
pub const LIMIT_VAR: &str = "WAKE2VEC_MAX_MEMORY";

/// The memory bound: physical memory, lowered by `WAKE2VEC_MAX_MEMORY`; `None` when neither
/// is known.
pub fn limit_bytes() -> anyhow::Result<Option<u64>> {
    let physical = physical_bytes();
    let Some(value) = std::env::var_os(LIMIT_VAR) else {
        return Ok(physical);
    };
    let value = value.to_string_lossy();
    let limit = parse_size(&value).with_context(|| {
        format!(
            "{LIMIT_VAR}={value} is not a size: give bytes or a number with K, M, G or T (e.g. 8G)"
        )
    })?;
    Ok(Some(physical.map_or(limit, |p| p.min(limit))))
}

/// `8G`, `512M`, `64K`, `1T` (powers of 1024) or a plain number of bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 10),
        (i, 'M' | 'm') => (&text[..i], 20),
        (i, 'G' | 'g') => (&text[..i], 30),
        (i, 'T' | 't') => (&text[..i], 40),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Refuses `bytes` of `what` when they exceed the memory bound ([`limit_bytes`]).
pub fn check_fits(bytes: u128, what: &str, fix: &str) -> anyhow::Result<()> {
    if let Some(limit) = limit_bytes()? {
        let source = if std::env::var_os(LIMIT_VAR).is_some() {
            format!("the {LIMIT_VAR} limit of")
        } else {
            "this machine's".to_string()
        };
        anyhow::ensure!(
            bytes <= u128::from(limit),
            "{what} needs {} of memory, more than {source} {}: {fix}",
            gib(bytes),
            gib(u128::from(limit))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sizes() {
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn knows_the_memory_and_refuses_more() {
        let total = physical_bytes().expect("Linux reports its memory");
        assert!(total > 1 << 20);
        assert!(check_fits(u128::from(total) / 2, "half", "").is_ok());
        let err = check_fits(u128::from(total) * 2, "twice", "use less").unwrap_err();
        assert!(err.to_string().starts_with("twice needs "), "{err}");
        assert!(err.to_string().ends_with(": use less"), "{err}");
    }
}
