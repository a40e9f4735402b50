//! Client-credential login and bearer tokens: HS256 JWTs carrying `exp`, and the HMAC that also
//! signs object URLs.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256 of `data`, base64url without padding.
pub fn sign(key: &[u8], data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Whether an `Authorization: Basic …` header carries exactly these credentials.
pub fn basic_matches(header: &str, client_id: &str, secret: &str) -> bool {
    let Some(encoded) = header.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Ok(text) = String::from_utf8(decoded) else {
        return false;
    };
    // The client id may contain `#` (region prefix) but not `:`; the secret may contain anything.
    text.split_once(':').is_some_and(|(id, s)| id == client_id && s == secret)
}

/// A signed JWT for `subject` that expires at `exp` (Unix seconds).
pub fn issue_token(key: &[u8], subject: &str, iat: i64, exp: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({"sub": subject, "iat": iat, "exp": exp, "iss": "dap-replica-emulator"});
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = sign(key, signing_input.as_bytes());
    format!("{signing_input}.{signature}")
}

#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
    Expired,
}

/// Checks a bearer token's signature and `exp` against `now` (Unix seconds).
pub fn verify_token(key: &[u8], token: &str, now: i64) -> Result<(), TokenError> {
    let (signing_input, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    if sign(key, signing_input.as_bytes()) != signature {
        return Err(TokenError::BadSignature);
    }
    let payload = signing_input.split_once('.').ok_or(TokenError::Malformed)?.1;
    let claims: serde_json::Value = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed)?;
    let exp = claims["exp"].as_i64().ok_or(TokenError::Malformed)?;
    if exp <= now { Err(TokenError::Expired) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_until_they_expire() {
        let t = issue_token(b"k", "us-east-1#abc", 100, 200);
        assert_eq!(t.split('.').count(), 3);
        assert_eq!(verify_token(b"k", &t, 150), Ok(()));
        assert_eq!(verify_token(b"k", &t, 200), Err(TokenError::Expired));
        assert_eq!(verify_token(b"other", &t, 150), Err(TokenError::BadSignature));
        assert_eq!(verify_token(b"k", "nonsense", 150), Err(TokenError::Malformed));
    }

    #[test]
    fn basic_credentials_allow_hash_in_the_id() {
        let h = format!("Basic {}", STANDARD.encode("us-east-1#abc:s3:cret"));
        assert!(basic_matches(&h, "us-east-1#abc", "s3:cret"));
        assert!(!basic_matches(&h, "us-east-1#abc", "wrong"));
        assert!(!basic_matches("Bearer x", "a", "b"));
    }
}
