//! The API's per-endpoint rate limits (requests per window, independent per endpoint), with a
//! configurable window so tests can run them fast.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::faults::Endpoint;

/// The documented limits per minute: POST data 5, GET job 500, GET table list 5, GET schema 500,
/// POST object/url 200. Login and downloads are not limited.
pub fn documented_limit(e: Endpoint) -> Option<usize> {
    match e {
        Endpoint::Query | Endpoint::TableList => Some(5),
        Endpoint::Job | Endpoint::Schema => Some(500),
        Endpoint::ObjectUrl => Some(200),
        Endpoint::Login | Endpoint::Object => None,
    }
}

pub struct RateLimiter {
    window: Duration,
    seen: HashMap<Endpoint, VecDeque<Instant>>,
}

impl RateLimiter {
    pub fn new(window: Duration) -> RateLimiter {
        RateLimiter { window, seen: HashMap::new() }
    }

    /// Admits a request now, or says how long until one would be admitted.
    pub fn admit(&mut self, e: Endpoint, now: Instant) -> Result<(), Duration> {
        let Some(limit) = documented_limit(e) else {
            return Ok(());
        };
        let q = self.seen.entry(e).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= self.window) {
            q.pop_front();
        }
        if q.len() >= limit {
            return Err(self.window - now.duration_since(q[0]));
        }
        q.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_queries_per_window() {
        let mut r = RateLimiter::new(Duration::from_secs(6));
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(r.admit(Endpoint::Query, t0 + Duration::from_millis(i)).is_ok());
        }
        let wait = r.admit(Endpoint::Query, t0 + Duration::from_secs(1)).unwrap_err();
        assert!(wait <= Duration::from_secs(5) && wait > Duration::from_secs(4));
        assert!(r.admit(Endpoint::Schema, t0).is_ok(), "endpoints are independent");
        assert!(r.admit(Endpoint::Query, t0 + Duration::from_secs(6)).is_ok());
        assert!(r.admit(Endpoint::Object, t0).is_ok());
    }
}
