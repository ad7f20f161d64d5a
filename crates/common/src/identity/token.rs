//! The service-account token a CSR is authenticated with. Kubernetes
//! rotates the projected token in place, so the file is read again for
//! every CSR and never cached.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// A bearer token; `Debug` never shows it.
#[derive(Clone)]
pub struct Token(Zeroizing<String>);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Token(Zeroizing::new(value.into()))
    }

    /// The raw JWT, for the `authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token([redacted], {} bytes)", self.0.len())
    }
}

/// Where the token lives.
#[derive(Clone, Debug)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TokenFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file now. Errors name the path (and never the content).
    /// A token is a small file on a local (projected) volume: it is read
    /// inline rather than through the blocking pool, which would keep a
    /// thread and its allocator arena around for one read a day.
    pub fn read(&self) -> Result<Token> {
        let unreadable = |source| Error::TokenUnreadable {
            path: self.path.clone(),
            source,
        };
        let raw = Zeroizing::new(std::fs::read(&self.path).map_err(unreadable)?);
        let text = std::str::from_utf8(&raw).map_err(|_| {
            unreadable(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8",
            ))
        })?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(Error::TokenEmpty {
                path: self.path.clone(),
            });
        }
        Ok(Token::new(trimmed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_current_content_every_time() {
        let dir = std::env::temp_dir().join(format!("meshid-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("istio-token");
        let file = TokenFile::new(&path);
        let err = file.read().unwrap_err();
        assert!(matches!(err, Error::TokenUnreadable { .. }), "{err}");
        assert!(err.to_string().contains("istio-token"), "{err}");

        std::fs::write(&path, "first.jwt\n").unwrap();
        assert_eq!(file.read().unwrap().expose(), "first.jwt");
        std::fs::write(&path, "second.jwt").unwrap();
        assert_eq!(file.read().unwrap().expose(), "second.jwt");

        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(file.read().unwrap_err(), Error::TokenEmpty { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_hides_the_token() {
        let dbg = format!("{:?}", Token::new("eyJhbGciOi.secret.sig"));
        assert!(!dbg.contains("secret"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }
}
