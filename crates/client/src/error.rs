//! The client's error type: either an errno the file system answered, or a failure to reach a
//! server within the retry deadline.

use cairn_proto::errno;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The file system answered with this errno.
    #[error("errno {0}")]
    Errno(i32),
    /// No answer before the retry deadline ran out.
    #[error("{what}: no answer within {seconds} s: {last}")]
    Timeout { what: &'static str, seconds: u64, last: String },
    /// A server refused the request for a reason retrying cannot fix.
    #[error("{what}: {status}")]
    Refused { what: &'static str, status: String },
    /// A block's data did not match its digest on every copy tried.
    #[error("block {0} failed verification")]
    Corrupt(String),
    /// A data server refused the block token (expired, or of a retired key): the block map
    /// must be fetched again for fresh ones.
    #[error("block token refused: {0}")]
    TokenRefused(String),
}

impl ClientError {
    /// The errno a system call should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Errno(code) => *code,
            ClientError::Timeout { .. }
            | ClientError::Refused { .. }
            | ClientError::Corrupt(_)
            | ClientError::TokenRefused(_) => errno::EIO,
        }
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

/// Turns an errno field of a reply into a result.
pub fn check(code: i32) -> ClientResult<()> {
    if code == 0 { Ok(()) } else { Err(ClientError::Errno(code)) }
}
