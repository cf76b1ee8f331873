//! Per worker thread, per client: what the hot path resolves by client name
//! (the request's metric series, the caller limiter), in one record found by
//! the client's address.
//!
//! With thousands of clients, each map keyed by client name that a request
//! consults costs cache misses of its own (its slot, the key to compare, the
//! value), and a request consulted three: the two metric series that carry
//! the client label and the limiter. One record per client, on the thread
//! that serves the request, puts them together: one slot, a few adjacent
//! lines, and no lock or shared counter touched to find it.
//!
//! A record holds a `Weak` to its client, so while it exists no other client
//! can be allocated at that address: an address found here is the same
//! client. Clients go with the config that made them (a reload makes new
//! ones); the records of old clients are unreachable from then on, and go
//! when a thread's map reaches [`MAX_RECORDS`] and is cleared.
//!
//! A record also counts its client's requests and caller-limit decisions
//! itself (`telemetry::Pending`): with thousands of clients, the exporter's
//! counters are three allocations each, out of the CPU's caches. The counts
//! go into those counters when `/metrics` is scraped ([`flush`]), or when the
//! record goes. So that a scrape reaches them, each thread's map sits behind
//! a mutex that only its own thread takes, except during [`flush`].

use crate::config::Client;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Records per thread before the map is cleared (clients of old configs
/// included; sized for tens of thousands of live clients).
pub const MAX_RECORDS: usize = 1 << 16;

/// Fields in the order a request reads them: with thousands of clients the
/// record is rarely in the CPU's caches, and each line a request reads costs a
/// miss (two or three lines for the limiter and the first series).
#[repr(C)]
pub struct ClientLocal {
    /// The caller limiter (`rate_limit`).
    pub limiter: crate::rate_limit::LocalLimiter,
    /// The metric series labelled with the client (`telemetry`).
    pub series: crate::telemetry::ClientSeries,
    _pin: Weak<Client>,
}

type Records = HashMap<usize, ClientLocal, foldhash::fast::FixedState>;

/// Every thread's map, for [`flush`].
static TABLES: Mutex<Vec<Weak<Mutex<Records>>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    static RECORDS: Arc<Mutex<Records>> = {
        let records = Arc::new(Mutex::new(Records::default()));
        let mut tables = lock(&TABLES);
        tables.retain(|t| t.strong_count() > 0);
        tables.push(Arc::downgrade(&records));
        records
    };
}

/// `f` with this thread's record of `client` (made if new). `f` must not
/// call `with` or [`flush`] (the map is locked).
pub fn with<R>(client: &Arc<Client>, f: impl FnOnce(&mut ClientLocal) -> R) -> R {
    RECORDS.with(|records| {
        let mut records = lock(records);
        let address = Arc::as_ptr(client) as usize;
        if records.len() >= MAX_RECORDS && !records.contains_key(&address) {
            records.clear();
        }
        let record = records.entry(address).or_insert_with(|| ClientLocal {
            limiter: Default::default(),
            series: Default::default(),
            _pin: Arc::downgrade(client),
        });
        f(record)
    })
}

/// Adds the counts every thread's records hold to the exporter's counters:
/// before `/metrics` is rendered (`telemetry::render`).
pub fn flush() {
    let tables: Vec<_> = lock(&TABLES).iter().filter_map(Weak::upgrade).collect();
    for table in tables {
        for record in lock(&table).values_mut() {
            record.series.flush();
        }
    }
}

/// This thread's record count (tests).
pub fn records() -> usize {
    RECORDS.with(|r| lock(r).len())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_live_client_and_none_shared_after_a_client_goes() {
        let before = records();
        let a = Client::named("a");
        let b = Client::named("b");
        with(&a, |r| r.limiter = Default::default());
        with(&b, |_| ());
        with(&a, |_| ());
        assert_eq!(records(), before + 2);
        // While a's record pins its address, a new client cannot take it.
        let a_address = Arc::as_ptr(&a) as usize;
        drop(a);
        let fresh: Vec<_> = (0..64).map(|i| Client::named(&i.to_string())).collect();
        assert!(fresh.iter().all(|c| Arc::as_ptr(c) as usize != a_address));
    }

    #[test]
    fn a_record_is_a_few_cache_lines() {
        // A hit reads its first 136 bytes: the limiter, a decision slot, a
        // request slot. With label values kept in the slots it took 520 bytes,
        // and with ten thousand clients a hit missed the cache in most of them.
        let size = std::mem::size_of::<(usize, ClientLocal)>();
        assert!(size <= 4 * 64, "a record takes {size} bytes");
    }
}
