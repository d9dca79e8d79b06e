//! Accounts and sessions: sign-up and sign-in with Argon2id-hashed
//! passwords, bearer tokens kept only as their SHA-256, and the extractor
//! that gives a handler the signed-in account.
//!
//! | route | answer |
//! |---|---|
//! | `POST /accounts` `{"email", "password"}` | 201 the account; 409 `email-taken`; 400 `bad-account` |
//! | `POST /sessions` `{"email", "password"}` | 201 `{"token", "expires_in"}`; 401 `bad-credentials` |
//! | `DELETE /sessions` (signed in) | 204: the token opens nothing from now on |
//!
//! Every other route that is a user's own (cart, checkout, orders,
//! recommendations) takes `Authorization: Bearer <token>` and answers 401
//! `unauthenticated` without a session.
//!
//! Hashes run one per core at most (more sign-ins wait their turn), and the
//! `account` class of `shop.toml` prices a sign-in as a product page, far
//! below a purchase, so a flood of sign-ins is shed before checkouts. What a store in
//! production adds and this example does not: e-mail verification (a
//! sign-up here says when an address has an account, as most stores' do),
//! and limits on attempts per address and per client address.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use serde::Deserialize;
use sha2::Digest as _;

use super::db::Account;
use super::{Shop, error, json, query};

/// How long a session stays open unless set otherwise
/// ([`Shop::with_session_lifetime`]).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Passwords shorter than this are refused.
pub const MIN_PASSWORD: usize = 8;

/// Nor longer than this (hashing is the expensive part of a request the
/// public can send).
pub const MAX_PASSWORD: usize = 128;

/// What sign-up and sign-in take.
#[derive(Deserialize)]
pub(crate) struct Credentials {
    email: String,
    password: String,
}

/// The signed-in account of a request: `Authorization: Bearer <token>` of
/// an open session. Without one, the request is answered 401
/// `unauthenticated` (with `WWW-Authenticate: Bearer`).
pub(crate) struct SignedIn(pub(crate) Account);

/// The account [`require_session`] found, in the request's extensions: a
/// type of this module's own, so that no other layer can make one.
#[derive(Clone)]
struct Authenticated(Account);

/// The semaphore of password hashes at once: one per core. Also makes the
/// decoy hash, so that the first unknown address is refused as fast as the
/// next.
pub(crate) fn hashing() -> std::sync::Arc<tokio::sync::Semaphore> {
    let _ = dummy_hash();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    std::sync::Arc::new(tokio::sync::Semaphore::new(cores))
}

/// How long a sign-up or sign-in waits for its turn to hash (its class's
/// deadline) before it is answered 503 `busy`.
const TURN_WAIT: Duration = Duration::from_secs(3);

/// A turn to hash a password, or — after [`TURN_WAIT`] — the store's 503
/// `busy`: the wait is outside the limiter's sight, so it is bounded here.
async fn turn(shop: &Shop) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    match tokio::time::timeout(
        TURN_WAIT,
        std::sync::Arc::clone(&shop.hashing).acquire_owned(),
    )
    .await
    {
        Ok(Ok(turn)) => Ok(turn),
        // Never closed; and a wait that ran out.
        Ok(Err(_)) | Err(_) => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many sign-ins at once; try again",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Err(r)
        }
    }
}

/// The largest sign-up or sign-in body taken.
pub(crate) const MAX_BODY: usize = 4096;

/// The store's error for a sign-up or sign-in body that could not be read
/// (too large: 413 `too-large`).
fn unreadable(e: &axum::extract::rejection::BytesRejection) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "the body is larger than this page takes",
        )
    } else {
        bad_account()
    }
}

impl FromRequestParts<Shop> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        shop: &Shop,
    ) -> Result<Self, Response> {
        // Looked up already (by `require_session`, before a CPU pool).
        if let Some(Authenticated(account)) = parts.extensions.get::<Authenticated>() {
            return Ok(Self(account.clone()));
        }
        let Some(token) = bearer(&parts.headers) else {
            return Err(unauthenticated());
        };
        let hash = token_hash(token);
        let now = unix_now();
        match query(&shop.db, move |db| db.session(&hash, now)).await? {
            Some(account) => Ok(Self(account)),
            None => Err(unauthenticated()),
        }
    }
}

/// Answers 401 `unauthenticated` for a request without an open session, and
/// puts the signed-in [`Account`] in the request's extensions for
/// [`SignedIn`] otherwise: for a route whose handler runs where it should
/// not wait on the database (the CPU pool).
pub(crate) async fn require_session(
    State(shop): State<Shop>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    match SignedIn::from_request_parts(&mut parts, &shop).await {
        Ok(SignedIn(account)) => {
            parts.extensions.insert(Authenticated(account));
            next.run(axum::extract::Request::from_parts(parts, body))
                .await
        }
        Err(refused) => refused,
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case),
/// if the request carries exactly one such field.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let mut fields = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(field), None) = (fields.next(), fields.next()) else {
        return None;
    };
    let (scheme, token) = field.to_str().ok()?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthenticated() -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "sign in first: POST /sessions, then send Authorization: Bearer <token>",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// What the database keeps of a token: its SHA-256, in hex.
fn token_hash(token: &str) -> String {
    let digest = sha2::Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes of the operating system's randomness, base64url.
fn fresh_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// An e-mail address as the store keys it: trimmed, lower-case; `None` if
/// it cannot be one.
fn normalized(email: &str) -> Option<String> {
    let email = email.trim().to_lowercase();
    let (local, domain) = email.split_once('@')?;
    let plausible = !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.len() <= 254
        && !domain.contains('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    plausible.then_some(email)
}

/// `POST /accounts`: opens an account (201), unless the address has one
/// (409 `email-taken`) or the address or password will not do (400
/// `bad-account`).
pub(crate) async fn sign_up(
    State(shop): State<Shop>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => return unreadable(&e),
    };
    let Some((email, password)) = credentials(&body) else {
        return bad_account();
    };
    let Some(email) = normalized(&email) else {
        return bad_account();
    };
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&password.chars().count()) {
        return bad_account();
    }
    let turn = match turn(&shop).await {
        Ok(turn) => turn,
        Err(busy) => return busy,
    };
    let created = query(&shop.db, move |db| {
        // The turn is held by the hash itself: a client that hangs up does
        // not free it while Argon2 still runs.
        let _turn = turn;
        // Hashed on the blocking pool, with a fresh salt.
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string());
        match hash {
            Ok(hash) => db.create_account(&email, &hash).map(Some),
            // Only a password over Argon2's own limits: refused above.
            Err(_) => Ok(None),
        }
    })
    .await;
    match created {
        Ok(Some(Some(account))) => json(StatusCode::CREATED, "no-store", &account),
        Ok(Some(None)) => error(
            StatusCode::CONFLICT,
            "email-taken",
            "an account with this e-mail address exists",
        ),
        Ok(None) => bad_account(),
        Err(r) => r,
    }
}

fn bad_account() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "bad-account",
        "send JSON {\"email\", \"password\"}: an e-mail address and 8 to 128 characters",
    )
}

/// The address (as sent) and password of a sign-up or sign-in body.
fn credentials(body: &[u8]) -> Option<(String, String)> {
    let c: Credentials = serde_json::from_slice(body).ok()?;
    Some((c.email, c.password))
}

/// `POST /sessions`: signs in (201 with a bearer token and its lifetime in
/// seconds), or 401 `bad-credentials` — the same answer, after the same
/// work, for an unknown address and a wrong password; 400 `bad-account`
/// for a body that is not `{"email", "password"}`.
pub(crate) async fn sign_in(
    State(shop): State<Shop>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => return unreadable(&e),
    };
    let Some((email, password)) = credentials(&body) else {
        return bad_account();
    };
    // No account has such an address, nor such a password: refused
    // without a hash.
    let Some(email) = normalized(&email) else {
        return bad_credentials();
    };
    if password.chars().count() > MAX_PASSWORD {
        return bad_credentials();
    }
    // Whole seconds, a fraction rounded up.
    let lifetime = Duration::from_secs(
        shop.session_lifetime
            .as_secs()
            .saturating_add(u64::from(shop.session_lifetime.subsec_nanos() > 0)),
    );
    let turn = match turn(&shop).await {
        Ok(turn) => turn,
        Err(busy) => return busy,
    };
    let opened = query(&shop.db, move |db| {
        let _turn = turn;
        let found = db.credentials(&email)?;
        let stored: &str = match &found {
            Some((_, hash)) => hash,
            None => dummy_hash(),
        };
        let matches = PasswordHash::new(stored).is_ok_and(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        });
        let Some((account, _)) = found.filter(|_| matches) else {
            return Ok(None);
        };
        let token = fresh_token();
        let now = unix_now();
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        db.open_session(
            &token_hash(&token),
            account.id,
            now,
            now.saturating_add(lifetime),
        )?;
        Ok(Some(token))
    })
    .await;
    match opened {
        Ok(Some(token)) => json(
            StatusCode::CREATED,
            "no-store",
            &serde_json::json!({ "token": token, "expires_in": lifetime.as_secs() }),
        ),
        Ok(None) => bad_credentials(),
        Err(r) => r,
    }
}

/// An Argon2id hash of no one's password (a random one, made once), verified
/// against when the address has no account: an unknown address takes as
/// long to refuse as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(fresh_token().as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

fn bad_credentials() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "bad-credentials",
        "no account with this e-mail address and password",
    )
}

/// `DELETE /sessions`: signs out (204); the token opens nothing after.
pub(crate) async fn sign_out(
    State(shop): State<Shop>,
    headers: http::HeaderMap,
    SignedIn(_): SignedIn,
) -> Response {
    let Some(hash) = bearer(&headers).map(token_hash) else {
        return unauthenticated();
    };
    match query(&shop.db, move |db| db.close_session(&hash)).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised_or_refused() {
        assert_eq!(
            normalized(" Ann@Shop.Example "),
            Some("ann@shop.example".into())
        );
        for bad in [
            "",
            "ann",
            "@shop.example",
            "ann@",
            "ann@example",
            "a b@shop.example",
            "ann@.example",
            "ann@shop.",
            "a@b@shop.example",
        ] {
            assert_eq!(normalized(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_one_bearer_field_is_a_token() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer def"),
        );
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn the_dummy_hash_parses_and_matches_nothing_sent() {
        let hash = PasswordHash::new(dummy_hash()).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"password", &hash)
                .is_err()
        );
    }

    #[test]
    fn tokens_are_fresh_and_kept_only_as_hashes() {
        let (a, b) = (fresh_token(), fresh_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), a);
    }

    /// Every hashing turn taken: a sign-in waits its class's deadline for
    /// one, then is answered the store's 503 `busy` with `Retry-After`,
    /// in the JSON error shape — and a sign-up as well.
    #[tokio::test(start_paused = true)]
    async fn a_sign_in_that_cannot_get_a_turn_to_hash_is_told_busy() {
        use tower::ServiceExt as _;
        let shop = Shop::in_memory().unwrap();
        let app = shop.router();
        let all = u32::try_from(shop.hashing.available_permits()).unwrap();
        let held = std::sync::Arc::clone(&shop.hashing)
            .acquire_many_owned(all)
            .await
            .unwrap();
        for path in ["/sessions", "/accounts"] {
            let asked = tokio::time::Instant::now();
            let r = app
                .clone()
                .oneshot(
                    http::Request::post(path)
                        .header("host", "shop.example")
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(
                            r#"{"email":"ann@shop.example","password":"correct horse battery"}"#,
                        ))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert_eq!(asked.elapsed(), TURN_WAIT, "{path}");
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
            let body = http_body_util::BodyExt::collect(r.into_body())
                .await
                .unwrap()
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"]["code"], "busy", "{json}");
        }
        drop(held);
        shop.shutdown().await;
    }
}
