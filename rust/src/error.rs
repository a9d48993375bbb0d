//! The one error type of the core. `bindings` maps each variant to one Python exception class.

use std::fmt;

/// Why an operation was refused or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// An argument has a bad value, shape, dtype or device (Python `ValueError`).
    Invalid {
        /// The argument's Python name.
        arg: &'static str,
        /// What it should have been.
        expected: String,
        /// What it was.
        got: String,
    },
    /// An argument has the wrong Python type (Python `TypeError`).
    WrongType {
        /// The argument's Python name.
        arg: &'static str,
        /// The type it should have had.
        expected: String,
        /// The type it had.
        got: String,
    },
    /// A valid combination that this build does not implement (Python `NotImplementedError`).
    Unsupported(String),
    /// A device or compiler failure (Python `natten_rs.KernelError`), with any compiler log.
    Kernel {
        /// What failed.
        message: String,
        /// The compiler's log, empty when there is none.
        log: String,
    },
}

/// Result of core operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A bad value: `arg` should have been `expected` but was `got`.
    pub fn invalid(arg: &'static str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Error::Invalid {
            arg,
            expected: expected.into(),
            got: got.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { arg, expected, got } | Error::WrongType { arg, expected, got } => {
                write!(f, "{arg}: expected {expected}, got {got}")
            }
            Error::Unsupported(what) => write!(f, "not supported: {what}"),
            Error::Kernel { message, log } if log.is_empty() => f.write_str(message),
            Error::Kernel { message, log } => write!(f, "{message}\n{log}"),
        }
    }
}

impl std::error::Error for Error {}
