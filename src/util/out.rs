//! Standard output for results. A reader that goes away (`wake2vec status R | head -1`) ends the
//! printing quietly, not the work: what a command writes to files is still written, and it exits
//! as it would have.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` to standard output, unless it has been closed; a closed pipe is remembered and
/// every later print skipped. Another write error is said once on stderr and ends printing too.
pub fn print(args: std::fmt::Arguments) {
    if closed() {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("warning: cannot write to standard output ({e}); output stops here");
        }
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// True once standard output has been closed by its reader (or failed).
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// `print!` through [`print`]: a closed standard output does not panic.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::util::out::print(format_args!($($arg)*)) };
}

/// `println!` through [`print`]: a closed standard output does not panic.
#[macro_export]
macro_rules! outln {
    () => { $crate::util::out::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::util::out::print(format_args!("{}\n", format_args!($($arg)*))) };
}
