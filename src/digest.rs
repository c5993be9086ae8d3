//! Content digests: the `sha256:<hex>` names that address every module, manifest and blob.
//!
//! This module owns parsing and hashing only; which bytes get hashed is up to `store` and
//! `fetch`.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The only algorithm the cache names files by; other algorithms are rejected when parsed.
pub const ALGORITHM: &str = "sha256";

/// A sha256 content digest, always in canonical lowercase form.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// Why a string is not a `sha256:<64 hex>` digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest '{input}': {reason}")]
pub struct ParseError {
    /// The text that failed to parse.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Digest {
    /// Hashes `bytes` in one go; meant for small documents such as manifests.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// Finishes a running hash.
    pub fn from_hasher(hasher: Sha256) -> Digest {
        Digest {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// Accepts a bare 64-character hex string (the form used in file names and wasme URLs).
    pub fn from_hex(hex: &str) -> Result<Digest, ParseError> {
        if hex.len() != 64 {
            return Err(ParseError {
                input: hex.to_owned(),
                reason: "expected 64 hexadecimal characters",
            });
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ParseError {
                input: hex.to_owned(),
                reason: "expected lowercase hexadecimal characters",
            });
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }

    /// The 64 lowercase hex characters, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(input: &str) -> Result<Digest, ParseError> {
        let Some((algorithm, hex)) = input.split_once(':') else {
            return Err(ParseError {
                input: input.to_owned(),
                reason: "expected 'sha256:<64 hex characters>'",
            });
        };
        if algorithm != ALGORITHM {
            return Err(ParseError {
                input: input.to_owned(),
                reason: "only sha256 digests are supported",
            });
        }
        Digest::from_hex(hex).map_err(|error| ParseError {
            input: input.to_owned(),
            reason: error.reason,
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALGORITHM}:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hashes_known_value() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rejects_bad_digests() {
        for input in [
            "",
            "sha256",
            "sha256:",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:../../../../etc/passwd",
        ] {
            let error = input.parse::<Digest>().unwrap_err();
            assert_eq!(error.input, input);
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(input in ".{0,80}") {
            let _ = input.parse::<Digest>();
        }

        #[test]
        fn display_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let digest = Digest::of(&bytes);
            prop_assert_eq!(digest.to_string().parse::<Digest>().unwrap(), digest);
        }
    }
}
