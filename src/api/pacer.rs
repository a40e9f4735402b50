//! Pacing of job creation to the API's limit (5 per minute for `POST …/data`).
//!
//! A creation is stamped when its response arrives, which is never earlier than the server saw
//! it, and requests still in flight hold their slot. So the server can never count more than
//! `limit` creations in any window, however late our requests reach it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

#[derive(Default)]
struct Slots {
    next_ticket: u64,
    /// (ticket, when the response arrived; `None` while in flight), oldest first.
    slots: VecDeque<(u64, Option<Instant>)>,
}

pub struct Pacer {
    limit: usize,
    window: Duration,
    state: Mutex<Slots>,
}

/// A held slot; give it back with [`Pacer::done`] when the response has arrived.
#[must_use]
pub struct Ticket(u64);

impl Pacer {
    pub fn new(limit: usize, window: Duration) -> Pacer {
        Pacer { limit: limit.max(1), window, state: Mutex::default() }
    }

    /// Waits until a creation may be sent.
    pub async fn acquire(&self) -> Ticket {
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                while s
                    .slots
                    .front()
                    .is_some_and(|(_, done)| done.is_some_and(|t| now.duration_since(t) >= self.window))
                {
                    s.slots.pop_front();
                }
                if s.slots.len() < self.limit {
                    let ticket = s.next_ticket;
                    s.next_ticket += 1;
                    s.slots.push_back((ticket, None));
                    return Ticket(ticket);
                }
                match s.slots.front() {
                    Some((_, Some(t))) => self.window.saturating_sub(now.duration_since(*t)),
                    _ => Duration::from_millis(20), // the oldest is still in flight
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// The limit as people say it: "5 jobs a minute", "2 jobs every 3 s".
    pub fn describe(&self) -> String {
        let jobs = if self.limit == 1 { "1 job".to_string() } else { format!("{} jobs", self.limit) };
        match self.window.as_secs() {
            60 if self.window.subsec_nanos() == 0 => format!("{jobs} a minute"),
            3600 if self.window.subsec_nanos() == 0 => format!("{jobs} an hour"),
            _ => format!("{jobs} every {} s", self.window.as_secs_f64()),
        }
    }

    /// How long a creation asked for now would wait (zero when a slot is free); an estimate for
    /// progress displays, as requests in flight may finish sooner.
    pub fn wait(&self) -> Duration {
        let Ok(s) = self.state.try_lock() else { return Duration::ZERO };
        let now = Instant::now();
        let busy: Vec<Option<Instant>> = s
            .slots
            .iter()
            .map(|(_, done)| *done)
            .filter(|done| done.is_none_or(|t| now.duration_since(t) < self.window))
            .collect();
        if busy.len() < self.limit {
            return Duration::ZERO;
        }
        busy.iter().flatten().map(|t| self.window.saturating_sub(now.duration_since(*t))).min().unwrap_or(self.window)
    }

    /// Stamps the slot with the time its response arrived.
    pub async fn done(&self, ticket: Ticket) {
        let mut s = self.state.lock().await;
        let now = Instant::now();
        if let Some(slot) = s.slots.iter_mut().find(|(t, _)| *t == ticket.0) {
            slot.1 = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_slot_is_the_oldest_creation_leaving_the_window() {
        let pacer = Pacer::new(1, Duration::from_secs(10));
        assert_eq!(pacer.wait(), Duration::ZERO);
        let ticket = pacer.acquire().await;
        pacer.done(ticket).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(pacer.wait(), Duration::from_secs(6));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(pacer.wait(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_limit_per_window_counted_from_the_responses() {
        let pacer = Pacer::new(2, Duration::from_secs(10));
        let start = Instant::now();
        let a = pacer.acquire().await;
        let b = pacer.acquire().await;
        tokio::time::sleep(Duration::from_secs(3)).await; // a slow response
        pacer.done(a).await;
        pacer.done(b).await;
        let _c = pacer.acquire().await;
        assert!(
            start.elapsed() >= Duration::from_secs(13),
            "the window starts when the response arrived: {:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_requests_hold_their_slot() {
        let pacer = Pacer::new(1, Duration::from_secs(1));
        let first = pacer.acquire().await;
        let waiting = tokio::time::timeout(Duration::from_secs(5), pacer.acquire()).await;
        assert!(waiting.is_err(), "no second slot while the first is in flight");
        pacer.done(first).await;
        let start = Instant::now();
        let _second = pacer.acquire().await;
        assert!(start.elapsed() >= Duration::from_millis(990));
    }

    #[test]
    fn the_limit_is_said_as_people_say_it() {
        assert_eq!(Pacer::new(5, Duration::from_secs(60)).describe(), "5 jobs a minute");
        assert_eq!(Pacer::new(2, Duration::from_secs(3)).describe(), "2 jobs every 3 s");
        assert_eq!(Pacer::new(1, Duration::from_secs(3600)).describe(), "1 job an hour");
    }
}
