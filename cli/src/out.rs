//! Printing to stdout without panicking when the reader has gone away.
//!
//! `println!` panics ("failed printing to stdout: Broken pipe") once the other end of a pipe closes, as
//! in `tickctl watch A0000 | head -3`. Everything tickctl prints goes through [`outln!`] instead, which
//! returns [`StdoutClosed`]: commands that only print (queries, `watch`, `dlq` listings) stop with `?`,
//! and `main` turns that into a quiet exit with status 0, as `head` expects of the programs it reads;
//! commands whose exit status is a verdict (`verify`, `produce`, `demo`, `bench`) ignore it and finish
//! their work, so the verdict is not lost with the output.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Stdout was closed by its reader. Not a failure: tickctl stops printing and exits 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed by its reader")
    }
}

impl std::error::Error for StdoutClosed {}

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout. Once a write has failed (the reader is gone, or any other write error:
/// there is nobody left to tell), every later call fails at once without writing.
pub fn line(args: std::fmt::Arguments<'_>) -> Result<(), StdoutClosed> {
    if CLOSED.load(Ordering::Relaxed) {
        return Err(StdoutClosed);
    }
    let mut out = std::io::stdout().lock();
    match out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        Ok(()) => Ok(()),
        Err(_) => {
            CLOSED.store(true, Ordering::Relaxed);
            Err(StdoutClosed)
        }
    }
}

/// Writes one line to stderr, ignoring failure (a closed stderr must not panic either).
pub fn err_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

/// Whether `e` (anywhere in its chain) is [`StdoutClosed`].
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<StdoutClosed>().is_some())
}

/// `println!` that returns `Err(`[`StdoutClosed`]`)` instead of panicking on a closed stdout.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

/// `println!` for commands whose exit status is a verdict: a closed stdout is ignored and the command
/// goes on (see the [module docs](self)).
macro_rules! sayln {
    ($($arg:tt)*) => {
        let _ = $crate::out::line(format_args!($($arg)*));
    };
}

/// `eprintln!` that ignores a closed stderr instead of panicking.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::err_line(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln, sayln};
