//! Identifier newtypes.
//!
//! User ids and topic names end up inside Redis key names, so they are
//! validated here, once, before anything else can see them: a `UserId` or a
//! `Topic` that exists is safe to put in a key.

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

/// Characters allowed in a user id (and, with `/`, in a topic name).
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | ':' | '+' | '=')
}

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be 1 to 128 characters long")]
    Length,
    #[error("contains a character outside A-Z a-z 0-9 _ - . @ : + =")]
    Chars,
    #[error("contains a character outside A-Z a-z 0-9 _ - . @ : + = /")]
    TopicChars,
}

fn check(s: &str, extra: Option<char>) -> Result<(), IdError> {
    if s.is_empty() || s.len() > 128 {
        return Err(IdError::Length);
    }
    if s.chars().all(|c| is_id_char(c) || Some(c) == extra) {
        Ok(())
    } else if extra.is_some() {
        Err(IdError::TopicChars)
    } else {
        Err(IdError::Chars)
    }
}

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        // Shared, not copied: ids are cloned into maps, messages and
        // connection handles all the time, and a clone is then a count.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A user id: 1–128 characters from `A–Z a–z 0–9 _ - . @ : + =`.
    UserId
);
string_id!(
    /// A topic name: like a user id, plus `/`.
    Topic
);
string_id!(
    /// A node id: a UUIDv4 made at boot (and again after a lost lease).
    NodeId
);
string_id!(
    /// A connection id: a UUIDv4, kept for the connection's whole life,
    /// even when its node takes a new id.
    ConnId
);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(s, None).map(|()| Self(s.into()))
    }
}

impl Topic {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(s, Some('/')).map(|()| Self(s.into()))
    }
}

impl NodeId {
    pub fn random() -> Self {
        Self(Uuid::new_v4().to_string().into())
    }
    /// A node id read back from Redis. It is only compared and used in key
    /// names we build ourselves, so any string read from our own keys will do.
    pub fn from_redis(s: String) -> Self {
        Self(s.into())
    }
}

impl ConnId {
    pub fn random() -> Self {
        Self(Uuid::new_v4().to_string().into())
    }
    pub fn from_redis(s: String) -> Self {
        Self(s.into())
    }
}

/// A fresh epoch for a user's seq counter (contract §9): random, so a
/// counter that starts again can never be mistaken for the old one.
pub fn new_epoch() -> String {
    Uuid::new_v4().simple().to_string()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("a.b-c_d@e:f+g=h9").is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::Length));
        assert_eq!(UserId::parse(&"x".repeat(129)), Err(IdError::Length));
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
        for bad in ["a b", "a}b", "a{b", "a/b", "é", "a*", "a\n"] {
            assert_eq!(UserId::parse(bad), Err(IdError::Chars), "{bad:?}");
        }
    }

    #[test]
    fn topics() {
        assert!(Topic::parse("news/sport").is_ok());
        assert_eq!(Topic::parse("news sport"), Err(IdError::TopicChars));
        assert_eq!(Topic::parse("{x}"), Err(IdError::TopicChars));
    }
}
