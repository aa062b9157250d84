//! Client authentication before the upgrade (contract §3).
//!
//! A JWT by `?token=` or `Authorization: Bearer`: HS256 with the secret, or
//! RS256/ES256 with `--jwt-public-key`; the algorithm is pinned by
//! configuration, `exp` is required, `nbf` honoured with leeway. With
//! `--dev`, `?user=NAME` is also accepted.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;

use crate::config::{Config, ConfigError, JwtKey};
use crate::ids::{Topic, UserId};

/// Topics a connection may subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicGrant {
    /// `--dev` with `?user=`: any topic.
    All,
    /// Exact names, or prefixes ending in `*`. Empty: none.
    List(Vec<String>),
}

impl TopicGrant {
    pub fn allows(&self, t: &Topic) -> bool {
        match self {
            TopicGrant::All => true,
            TopicGrant::List(l) => l.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => t.as_str().starts_with(prefix),
                None => p == t.as_str(),
            }),
        }
    }
}

/// Who a connection is.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: UserId,
    pub topics: TopicGrant,
    /// The token's `exp` (Unix s); `None` for a `--dev` `?user=` name.
    pub exp: Option<u64>,
}

/// Why authentication failed (the client gets 401; the reason is logged).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("bad user id in token: {0}")]
    BadSub(crate::ids::IdError),
    #[error("bad ?user: {0}")]
    BadDevUser(crate::ids::IdError),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// Required by the validation; a number (some issuers write floats).
    exp: f64,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

pub struct Auth {
    key: Option<(DecodingKey, Validation)>,
    dev: bool,
}

impl Auth {
    pub fn new(cfg: &Config) -> Result<Self, ConfigError> {
        let (key, alg) = match &cfg.jwt_key {
            JwtKey::None => {
                return Ok(Auth {
                    key: None,
                    dev: cfg.dev,
                });
            }
            JwtKey::Hs256(secret) => (DecodingKey::from_secret(secret), Algorithm::HS256),
            JwtKey::PublicPem(pem) => match DecodingKey::from_rsa_pem(pem) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => (
                    DecodingKey::from_ec_pem(pem).map_err(|_| {
                        ConfigError::PublicKey("not an RSA or EC public key in PEM form".into())
                    })?,
                    Algorithm::ES256,
                ),
            },
        };
        let mut v = Validation::new(alg);
        v.leeway = cfg.jwt_leeway_s;
        v.validate_exp = true;
        v.validate_nbf = true;
        // A configured audience or issuer must be present, not just right
        // when present (jsonwebtoken checks them only if the token has them).
        let mut required = vec!["exp", "sub"];
        match &cfg.jwt_audience {
            Some(a) => {
                v.set_audience(&[a]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(i) = &cfg.jwt_issuer {
            v.set_issuer(&[i]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        Ok(Auth {
            key: Some((key, v)),
            dev: cfg.dev,
        })
    }

    /// Check a token (always, when one is given) or, with `--dev`, a
    /// `?user=` name.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        dev_user: Option<&str>,
    ) -> Result<Principal, AuthError> {
        if let Some(token) = token {
            let Some((key, validation)) = &self.key else {
                return Err(AuthError::Missing);
            };
            let data = decode::<Claims>(token, key, validation)?;
            let user = UserId::parse(&data.claims.sub).map_err(AuthError::BadSub)?;
            return Ok(Principal {
                user,
                topics: TopicGrant::List(data.claims.topics.unwrap_or_default()),
                exp: Some(data.claims.exp.max(0.0) as u64),
            });
        }
        if self.dev
            && let Some(u) = dev_user
        {
            return Ok(Principal {
                user: UserId::parse(u).map_err(AuthError::BadDevUser)?,
                topics: TopicGrant::All,
                exp: None,
            });
        }
        Err(AuthError::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn cfg(args: &[&str]) -> Config {
        let mut v = vec!["wscluster"];
        v.extend_from_slice(args);
        Config::try_parse_from(v).unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn in_an_hour() -> u64 {
        crate::message::now_ms() / 1000 + 3600
    }

    #[test]
    fn hs256() {
        let a = Auth::new(&cfg(&["--jwt-secret", "k"])).unwrap();
        let t = token(
            "k",
            serde_json::json!({"sub":"bob","exp":in_an_hour(),"topics":["news/*","x"]}),
        );
        let p = a.authenticate(Some(&t), None).unwrap();
        assert_eq!(p.user.as_str(), "bob");
        assert!(p.topics.allows(&Topic::parse("news/a").unwrap()));
        assert!(p.topics.allows(&Topic::parse("x").unwrap()));
        assert!(!p.topics.allows(&Topic::parse("xy").unwrap()));
        // Forged, expired, no exp, bad sub, alg none: all refused.
        let forged = token("other", serde_json::json!({"sub":"bob","exp":in_an_hour()}));
        assert!(a.authenticate(Some(&forged), None).is_err());
        let expired = token("k", serde_json::json!({"sub":"bob","exp":1000}));
        assert!(a.authenticate(Some(&expired), None).is_err());
        let no_exp = token("k", serde_json::json!({"sub":"bob"}));
        assert!(a.authenticate(Some(&no_exp), None).is_err());
        let bad_sub = token("k", serde_json::json!({"sub":"a b","exp":in_an_hour()}));
        assert!(matches!(
            a.authenticate(Some(&bad_sub), None),
            Err(AuthError::BadSub(_))
        ));
        let none_alg =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJib2IiLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(a.authenticate(Some(none_alg), None).is_err());
        // No dev: ?user is refused.
        assert!(a.authenticate(None, Some("bob")).is_err());
        // No topics claim: no topics.
        let t = token("k", serde_json::json!({"sub":"bob","exp":in_an_hour()}));
        let p = a.authenticate(Some(&t), None).unwrap();
        assert!(!p.topics.allows(&Topic::parse("x").unwrap()));
    }

    #[test]
    fn dev_user() {
        let a = Auth::new(&cfg(&["--dev"])).unwrap();
        let p = a.authenticate(None, Some("alice")).unwrap();
        assert_eq!(p.topics, TopicGrant::All);
        assert!(a.authenticate(None, Some("a}b")).is_err());
        assert!(a.authenticate(None, None).is_err());
    }
}
