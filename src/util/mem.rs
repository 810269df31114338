//! How much memory this machine has: the bound wake2vec checks sizes from files and flags
//! against before allocating, so that an impossible size is one clear error, not an abort.

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

/// Refuses `bytes` of `what` when they exceed this machine's physical memory.
pub fn check_fits(bytes: u128, what: &str, fix: &str) -> anyhow::Result<()> {
    if let Some(total) = physical_bytes() {
        anyhow::ensure!(
            bytes <= u128::from(total),
            "{what} needs {} of memory, more than this machine's {}: {fix}",
            gib(bytes),
            gib(u128::from(total))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
