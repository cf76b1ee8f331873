//! Per worker thread, per client: what the hot path resolves by client name
//! (the request's metric series, the caller limiter), in one record found by
//! the client's place in its config ([`Client::index`]).
//!
//! With thousands of clients, each map keyed by client name that a request
//! consults costs cache misses of its own (its slot, the key to compare, the
//! value), and a request consulted three: the two metric series that carry
//! the client label and the limiter. One record per client, on the thread
//! that serves the request, puts them together, and what a request reads of
//! it is one cache line (the record is two, aligned; the second is read when
//! a series is first seen and at a scrape). No lock or shared counter is
//! touched to find it, and no hashing: the records are an array.
//!
//! A record names its client by address, and holds a `Weak` to it, so while
//! it exists no other client can be allocated at that address: an address
//! found here is the same client. Clients go with the config that made them
//! (a reload makes new ones); a client of another config at the same place
//! takes the record over (the old client's counts go to its counters first).
//! A thread holds as many records as the largest config had clients (128
//! bytes each).
//!
//! A record also counts its client's requests and caller-limit decisions
//! itself (`telemetry::ClientSeries`): with thousands of clients, the
//! exporter's counters are three allocations each, out of the CPU's caches.
//! The counts go into those counters when `/metrics` is scraped ([`flush`]),
//! or when the record goes. So that a scrape reaches them, each thread's
//! records sit behind a mutex that only its own thread takes, except during
//! [`flush`].

use crate::config::Client;
use crate::sync::lock;
use std::sync::{Arc, Mutex, Weak};

/// Fields in the order a request reads them: with thousands of clients the
/// record is rarely in the CPU's caches, and each line a request reads costs a
/// miss. The first line holds what a request reads (the client check, the
/// limiter, the series' slots); the second what it rarely does.
#[repr(C, align(64))]
pub struct ClientLocal {
    /// The address of the client this record is for (0: none yet).
    client: usize,
    /// The caller limiter (`rate_limit`).
    pub limiter: crate::rate_limit::LocalLimiter,
    /// The metric series labelled with the client (`telemetry`).
    pub series: crate::telemetry::ClientSeries,
    /// Keeps `client`'s address from being reused while this exists.
    pin: Weak<Client>,
}

impl ClientLocal {
    fn new(client: &Arc<Client>) -> Self {
        ClientLocal {
            client: Arc::as_ptr(client) as usize,
            limiter: Default::default(),
            series: Default::default(),
            pin: Arc::downgrade(client),
        }
    }

    fn empty() -> Self {
        ClientLocal {
            client: 0,
            limiter: Default::default(),
            series: Default::default(),
            pin: Weak::new(),
        }
    }
}

type Records = Vec<ClientLocal>;

/// Every thread's records, for [`flush`].
static TABLES: Mutex<Vec<Weak<Mutex<Records>>>> = Mutex::new(Vec::new());

thread_local! {
    static RECORDS: Arc<Mutex<Records>> = {
        let records = Arc::new(Mutex::new(Records::new()));
        let mut tables = lock(&TABLES);
        tables.retain(|t| t.strong_count() > 0);
        tables.push(Arc::downgrade(&records));
        records
    };
}

/// `f` with this thread's record of `client` (made if new). `f` must not
/// call `with` or [`flush`] (the records are locked).
pub fn with<R>(client: &Arc<Client>, f: impl FnOnce(&mut ClientLocal) -> R) -> R {
    RECORDS.with(|records| {
        let mut records = lock(records);
        let at = client.index;
        if records.len() <= at {
            records.resize_with(at + 1, ClientLocal::empty);
        }
        let record = &mut records[at];
        if record.client != Arc::as_ptr(client) as usize {
            *record = ClientLocal::new(client);
        }
        f(record)
    })
}

/// Adds the counts every thread's records hold to the exporter's counters:
/// before `/metrics` is rendered (`telemetry::render`).
pub fn flush() {
    let tables: Vec<_> = lock(&TABLES).iter().filter_map(Weak::upgrade).collect();
    for table in tables {
        for record in lock(&table).iter_mut() {
            record.series.flush();
        }
    }
}

/// This thread's records in use (tests).
pub fn records() -> usize {
    RECORDS.with(|r| lock(r).iter().filter(|r| r.client != 0).count())
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
    fn a_client_of_another_config_at_the_same_place_takes_the_record_over() {
        let old = Client::named("old");
        let new = Client::named_at("new", old.index);
        let before = records();
        with(&old, |r| r.limiter = Default::default());
        with(&new, |_| ());
        assert_eq!(records(), before + 1, "one place, one record");
        // The old client's record went; the new one's is its own.
        with(&new, |r| assert_eq!(r.client, Arc::as_ptr(&new) as usize));
        with(&old, |r| assert_eq!(r.client, Arc::as_ptr(&old) as usize));
    }

    #[test]
    fn what_a_request_reads_of_a_record_is_one_cache_line() {
        // The client check, the limiter and the series' slots: with ten
        // thousand clients, each line of a record a hit read was a miss (four
        // of them, when the record was 240 bytes at any alignment).
        let hot =
            std::mem::offset_of!(ClientLocal, series) + crate::telemetry::ClientSeries::HOT_BYTES;
        assert!(hot <= 64, "a request reads {hot} bytes");
        assert_eq!(std::mem::align_of::<ClientLocal>(), 64);
        assert_eq!(std::mem::size_of::<ClientLocal>(), 128);
    }
}
