//! Callback promises: the leader's memory of which session caches which inode, and the breaking
//! of those promises when an inode changes.
//!
//! A promise covers everything a client may cache about one inode: its attributes, a
//! directory's names and a file's data map. It lives as long as the holder's promise lease,
//! which the holder renews over its callback stream. Promises are kept only in the leader's
//! memory, for one term: a new leader starts with none and, for one lease, treats every live
//! session that has not re-registered with it as holding everything.
//!
//! Breaking is synchronous for the writer: `break_and_wait` returns once every holder
//! acknowledged (its client and kernel forgot the inode) or its lease ran out, so a reply to
//! the writer happens-after every other client stopped trusting the old state. From a holder
//! with its own change to the inode in flight it waits only until that client's cache forgot
//! (its kernel may hold a lock the kernel's part waits for until that change returns); the
//! client's opens then catch its kernel up themselves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto as pb;
use tokio::sync::{mpsc, watch};

/// Inodes one session may hold promises on; past this, reads are answered without a promise.
pub const PROMISES_PER_SESSION_MAX: usize = 1_000_000;
/// Directories whose returns are counted at most.
const RETURNS_TRACKED_MAX: usize = 4096;
/// Changes remembered for reads that promise after they read (see `promise`).
const RECENT_CHANGES_MAX: usize = 4096;
/// Messages queued to one client's stream; a client that falls this far behind loses its stream
/// (its promises then end with its lease).
pub const STREAM_QUEUE: usize = 1024;

struct Holder {
    /// Identifies the stream that attached last; messages of older streams are ignored.
    stream: u64,
    tx: Option<mpsc::Sender<pb::CallbackDown>>,
    /// The client re-registered what it caches with this leader.
    registered: bool,
    /// The client says when its own cache forgot a break, before its kernel did.
    sends_forgotten: bool,
    /// The first break sequence number the current stream may carry.
    first_seq: u64,
    inodes: HashSet<u64>,
    /// The holder stops trusting its promises by then (it renews before).
    expires: Instant,
    /// Breaks sent and not acknowledged yet, with the inodes each names.
    pending: HashMap<u64, Vec<u64>>,
    /// Those of `pending` whose client already dropped what it cached of their inodes (its
    /// kernel may not have yet).
    forgotten: HashSet<u64>,
    /// Inodes named by this session's mutations in flight, with their counts.
    in_flight: HashMap<u64, u32>,
}

impl Holder {
    fn new(now: Instant) -> Self {
        Holder {
            stream: 0,
            tx: None,
            registered: false,
            sends_forgotten: false,
            first_seq: 0,
            inodes: HashSet::new(),
            expires: now,
            pending: HashMap::new(),
            forgotten: HashSet::new(),
            in_flight: HashMap::new(),
        }
    }

    fn busy_with(&self, inodes: &[u64]) -> bool {
        inodes.iter().any(|ino| self.in_flight.contains_key(ino))
    }

    /// Whether a break naming one of `inodes` is still on its way to this holder.
    fn breaking(&self, inodes: &[u64]) -> bool {
        self.pending.values().any(|named| named.iter().any(|ino| inodes.contains(ino)))
    }
}

struct State {
    term: u64,
    /// Until then, sessions that have not registered with this leader may cache anything.
    grace_until: Instant,
    holders: HashMap<u64, Holder>,
    /// Changes counted since this state began; `recent` holds the last ones.
    changes: u64,
    recent: VecDeque<(u64, Vec<u64>)>,
    next_seq: u64,
    next_stream: u64,
    /// Returns of delegations counted per directory (see `returned`).
    returns: HashMap<u64, u64>,
}

impl State {
    fn new(term: u64, grace: Duration) -> Self {
        State {
            term,
            grace_until: Instant::now() + grace,
            holders: HashMap::new(),
            changes: 0,
            recent: VecDeque::new(),
            next_seq: 1,
            next_stream: 1,
            returns: HashMap::new(),
        }
    }

    /// Whether a change recorded after `since`, other than `except`, named one of `inodes` (or
    /// may have: the record no longer reaches back that far).
    fn changed_since(&self, since: u64, inodes: &[u64], except: Option<u64>) -> bool {
        if self.changes == since {
            return false;
        }
        match self.recent.front() {
            Some((first, _)) if *first <= since + 1 => {}
            _ => return true,
        }
        self.recent
            .iter()
            .filter(|(no, _)| *no > since && Some(*no) != except)
            .any(|(_, changed)| changed.iter().any(|c| inodes.contains(c)))
    }
}

/// What a writer waits for.
enum Wait {
    Ack { session: u64, seq: u64, inodes: Vec<u64> },
    Registration { session: u64 },
}

pub struct Promises {
    lease: Duration,
    state: Mutex<State>,
    /// Bumped on every acknowledgement, registration and end of a mutation: waiters re-check.
    events: watch::Sender<u64>,
}

/// A mutation in flight: while it lasts, the session is waited for on the inodes it names only
/// until its client forgot them, not its kernel (which may hold those directories locked until
/// the reply; the kernel's part of the acknowledgement would wait for that).
pub struct InFlight<'a> {
    promises: &'a Promises,
    session: u64,
    inodes: Vec<u64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.promises.lock();
        if let Some(holder) = state.holders.get_mut(&self.session) {
            for ino in &self.inodes {
                if let Some(count) = holder.in_flight.get_mut(ino) {
                    *count -= 1;
                    if *count == 0 {
                        holder.in_flight.remove(ino);
                    }
                }
            }
        }
        drop(state);
        self.promises.bump();
    }
}

impl Promises {
    pub fn new(lease: Duration) -> Self {
        Promises { lease, state: Mutex::new(State::new(0, lease)), events: watch::channel(0).0 }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state, moved to `term` if that is newer: a new term starts with no promises and a
    /// grace period.
    fn lock_term(&self, term: u64) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.lock();
        if term > state.term {
            *state = State::new(term, self.lease);
            self.bump();
        }
        state
    }

    fn bump(&self) {
        self.events.send_modify(|n| *n += 1);
    }

    /// Attaches a session's new callback stream; returns the stream's id.
    pub fn attach(&self, term: u64, session: u64, tx: mpsc::Sender<pb::CallbackDown>, sends_forgotten: bool) -> u64 {
        let mut state = self.lock_term(term);
        let stream = state.next_stream;
        state.next_stream += 1;
        let now = Instant::now();
        let lease = self.lease;
        let first_seq = state.next_seq;
        let holder = state.holders.entry(session).or_insert_with(|| Holder::new(now));
        holder.stream = stream;
        holder.tx = Some(tx);
        holder.registered = false;
        holder.sends_forgotten = sends_forgotten;
        holder.first_seq = first_seq;
        holder.expires = holder.expires.max(now + lease);
        stream
    }

    /// The stream ended: its promises last until the holder's lease runs out.
    pub fn detach(&self, session: u64, stream: u64) {
        let mut state = self.lock();
        if let Some(holder) = state.holders.get_mut(&session)
            && holder.stream == stream
        {
            holder.tx = None;
        }
        drop(state);
        self.bump();
    }

    /// The client finished re-registering: breaks sent before its stream are covered, since
    /// registration compared what it caches with the current state. Those sent on the stream
    /// (a change made while it registered) are still waited for.
    pub fn registered(&self, term: u64, session: u64, stream: u64) -> bool {
        let mut state = self.lock_term(term);
        let current = state.term == term;
        let ok = match state.holders.get_mut(&session) {
            Some(holder) if current && holder.stream == stream => {
                holder.registered = true;
                let first_seq = holder.first_seq;
                holder.pending.retain(|seq, _| *seq >= first_seq);
                holder.forgotten.retain(|seq| *seq >= first_seq);
                true
            }
            _ => false,
        };
        drop(state);
        self.bump();
        ok
    }

    /// Extends the holder's lease (the leader just confirmed it leads).
    pub fn renew(&self, term: u64, session: u64, stream: u64) -> bool {
        let mut state = self.lock_term(term);
        let lease = self.lease;
        let current = state.term == term;
        match state.holders.get_mut(&session) {
            Some(holder) if current && holder.stream == stream && holder.tx.is_some() => {
                holder.expires = Instant::now() + lease;
                true
            }
            _ => false,
        }
    }

    /// The holder applied break `seq` of `term`, in its cache and its kernel's.
    pub fn ack(&self, term: u64, session: u64, stream: u64, seq: u64) {
        let mut state = self.lock();
        let current = state.term == term;
        if let Some(holder) = state.holders.get_mut(&session)
            && current
            && holder.stream == stream
        {
            holder.pending.remove(&seq);
            holder.forgotten.remove(&seq);
        }
        drop(state);
        self.bump();
    }

    /// The holder's own cache forgot what break `seq` of `term` named; its kernel may not have
    /// yet.
    pub fn forgotten(&self, term: u64, session: u64, stream: u64, seq: u64) {
        let mut state = self.lock();
        let current = state.term == term;
        if let Some(holder) = state.holders.get_mut(&session)
            && current
            && holder.stream == stream
            && holder.pending.contains_key(&seq)
        {
            holder.forgotten.insert(seq);
        }
        drop(state);
        self.bump();
    }

    /// Whether a new leader's grace period still runs (see `break_and_wait`).
    pub fn in_grace(&self, term: u64) -> bool {
        Instant::now() < self.lock_term(term).grace_until
    }

    /// Changes counted so far in `term`: a read takes this before it reads, and passes it to
    /// `promise` after.
    pub fn changes(&self, term: u64) -> u64 {
        self.lock_term(term).changes
    }

    /// Promises `inodes` to `session`, as read after change number `since`. Refused when a
    /// change since then named one of them (the read may predate it and the break may have
    /// gone out before this promise existed), when the session has no stream here, or when it
    /// holds too many.
    pub fn promise(&self, term: u64, session: u64, inodes: &[u64], since: u64) -> bool {
        self.promise_unless_changed(term, session, inodes, since, None)
    }

    /// Promises `inodes` to `session` as its own change number `own` left them, the change
    /// having been proposed after change number `since` was counted. Changes are counted in
    /// the order their breaks go out, which is not the order they were applied in: one
    /// counted before `own` may have been applied after it, and its effect is then missing from
    /// the reply, while its break went out before this promise existed. So every change
    /// counted since the proposal but `own` keeps the promise off.
    pub fn promise_own(&self, term: u64, session: u64, inodes: &[u64], since: u64, own: u64) -> bool {
        self.promise_unless_changed(term, session, inodes, since, Some(own))
    }

    fn promise_unless_changed(&self, term: u64, session: u64, inodes: &[u64], since: u64, except: Option<u64>) -> bool {
        if session == 0 {
            return false;
        }
        let mut state = self.lock_term(term);
        if state.term != term || state.changed_since(since, inodes, except) {
            return false;
        }
        let Some(holder) = state.holders.get_mut(&session) else { return false };
        if holder.tx.is_none() || holder.inodes.len() + inodes.len() > PROMISES_PER_SESSION_MAX {
            return false;
        }
        // A break still on its way may reach the client after this reply. A reply to its own
        // change would then be taken as the whole news about an inode that changed before it
        // too (a directory's names with only this client's change applied): not promised.
        if holder.breaking(inodes) {
            return false;
        }
        holder.inodes.extend(inodes.iter().copied());
        true
    }

    /// Sends `session` a break for `inodes` it may cache (a re-registered inode that changed).
    pub fn break_one(&self, term: u64, session: u64, inodes: Vec<u64>) {
        let mut state = self.lock_term(term);
        let seq = state.next_seq;
        state.next_seq += 1;
        if let Some(holder) = state.holders.get_mut(&session) {
            for ino in &inodes {
                holder.inodes.remove(ino);
            }
            send_break(holder, seq, inodes, term, 0);
        }
    }

    /// Records a mutation by `session` naming `inodes` as in flight until the guard drops.
    pub fn begin_mutation(&self, term: u64, session: u64, inodes: Vec<u64>) -> InFlight<'_> {
        let mut state = self.lock_term(term);
        let now = Instant::now();
        let holder = state.holders.entry(session).or_insert_with(|| Holder::new(now));
        for ino in &inodes {
            *holder.in_flight.entry(*ino).or_insert(0) += 1;
        }
        drop(state);
        self.bump();
        InFlight { promises: self, session, inodes }
    }

    /// Breaks every other session's promises on `inodes` (which a committed mutation of
    /// `mutator` changed) and waits until each holder acknowledged, its lease ran out, or it
    /// has a mutation of its own in flight on one of them and its client (not yet its kernel)
    /// forgot them. While the grace period of a new
    /// leader lasts, it also waits for each of `live_sessions` to re-register.
    /// Returns the change's number: a promise to the writer on what it changed is checked
    /// against it.
    pub async fn break_and_wait(&self, term: u64, mutator: u64, inodes: &[u64], live_sessions: &[u64]) -> u64 {
        let mut waits = Vec::new();
        let change = {
            let mut state = self.lock_term(term);
            state.changes += 1;
            let change = state.changes;
            state.recent.push_back((change, inodes.to_vec()));
            while state.recent.len() > RECENT_CHANGES_MAX {
                state.recent.pop_front();
            }
            let now = Instant::now();
            state.holders.retain(|_, h| h.tx.is_some() || h.expires > now || !h.in_flight.is_empty());
            let mut next_seq = state.next_seq;
            for (&session, holder) in state.holders.iter_mut().filter(|(s, _)| **s != mutator) {
                let held: Vec<u64> = inodes.iter().copied().filter(|ino| holder.inodes.remove(ino)).collect();
                if held.is_empty() {
                    continue;
                }
                let seq = next_seq;
                next_seq += 1;
                send_break(holder, seq, held.clone(), term, change);
                waits.push(Wait::Ack { session, seq, inodes: held });
            }
            state.next_seq = next_seq;
            if now < state.grace_until {
                for &session in live_sessions.iter().filter(|s| **s != mutator) {
                    if !state.holders.get(&session).is_some_and(|h| h.registered) {
                        waits.push(Wait::Registration { session });
                    }
                }
            }
            change
        };
        let mut events = self.events.subscribe();
        // Every lease ends, so this ends; the bound guards against a clock that jumps.
        let give_up = Instant::now() + self.lease + self.lease;
        loop {
            let now = Instant::now();
            let next_expiry = {
                let state = self.lock();
                waits.retain(|wait| !satisfied(&state, wait, now));
                if waits.is_empty() || now >= give_up {
                    return change;
                }
                waits
                    .iter()
                    .map(|wait| match wait {
                        Wait::Ack { session, .. } => state.holders.get(session).map_or(now, |h| h.expires),
                        Wait::Registration { .. } => state.grace_until,
                    })
                    .min()
                    .unwrap_or(now)
            };
            let sleep = next_expiry.saturating_duration_since(now).min(give_up - now) + Duration::from_millis(1);
            let _ = tokio::time::timeout(sleep, events.changed()).await;
        }
    }

    /// The delegation of `dir` was returned and the change that returned it counted (its
    /// breaks sent): recalls waiting for it may read now and promise what they read.
    pub fn returned(&self, dir: u64) {
        {
            let mut state = self.lock();
            if state.returns.len() >= RETURNS_TRACKED_MAX {
                state.returns.clear();
            }
            *state.returns.entry(dir).or_insert(0) += 1;
        }
        self.bump();
    }

    /// How many times `dir`'s delegation was returned (see `returned`).
    pub fn returns(&self, dir: u64) -> u64 {
        self.lock().returns.get(&dir).copied().unwrap_or(0)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// Asks `session` to return its delegation of `dir`, once per stream of it (`sent_on`
    /// records the stream asked). Returns when the holder stops trusting anything it was
    /// granted, if it stays silent: its lease's end, or for a session not attached to this
    /// leader, the end of the grace period (it cannot renew without a stream here).
    pub fn recall(&self, term: u64, session: u64, dir: u64, sent_on: &mut Option<u64>) -> Instant {
        let mut state = self.lock_term(term);
        let grace_until = state.grace_until;
        let Some(holder) = state.holders.get_mut(&session) else { return grace_until };
        if let Some(tx) = &holder.tx
            && *sent_on != Some(holder.stream)
        {
            let recall = pb::CallbackRecall { dir };
            if tx.try_send(pb::CallbackDown { msg: Some(pb::callback_down::Msg::Recall(recall)) }).is_ok() {
                *sent_on = Some(holder.stream);
            }
        }
        holder.expires.max(if holder.registered { holder.expires } else { grace_until })
    }

    /// Sessions holding at least one promise, and promises held in all.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let holding = state.holders.values().filter(|h| !h.inodes.is_empty()).count();
        (holding, state.holders.values().map(|h| h.inodes.len()).sum())
    }
}

/// Whether a client's cached attributes still describe the inode. Every change to an inode
/// sets its ctime (a directory's too, when its names change) from the leader's clock; the other
/// fields guard against two changes stamped with the same time.
pub fn same_version(cached: &pb::Attr, current: &pb::Attr) -> bool {
    cached.ino == current.ino
        && cached.generation == current.generation
        && cached.ctime == current.ctime
        && cached.mtime == current.mtime
        && cached.size == current.size
        && cached.nlink == current.nlink
        && cached.perm == current.perm
        && cached.uid == current.uid
        && cached.gid == current.gid
}

/// Tells a holder its promises on `inodes` are broken by change `change` of `term` (0: none
/// counted).
fn send_break(holder: &mut Holder, seq: u64, inodes: Vec<u64>, term: u64, change: u64) {
    // Pending even if it cannot be sent: it ends with an acknowledgement, the holder's lease,
    // or the holder's next registration (see `satisfied`).
    holder.pending.insert(seq, inodes.clone());
    let Some(tx) = &holder.tx else { return };
    let broken = pb::CallbackBreak { seq, inodes, term, change };
    let message = pb::CallbackDown { msg: Some(pb::callback_down::Msg::Broken(broken)) };
    if tx.try_send(message).is_err() {
        // A stream this far behind (or gone) cannot be told: its promises end with its lease.
        holder.tx = None;
    }
}

fn satisfied(state: &State, wait: &Wait, now: Instant) -> bool {
    match wait {
        Wait::Ack { session, seq, inodes } => match state.holders.get(session) {
            None => true,
            Some(holder) => {
                holder.expires <= now
                    || !holder.pending.contains_key(seq)
                        && holder.tx.is_some()
                        // A break of an earlier stream, covered by the holder's registration
                        // on this one: once the breaks the registration sent are acknowledged.
                        && !(*seq < holder.first_seq && holder.breaking(inodes))
                    // Its kernel may hold a lock the invalidation waits for until the
                    // holder's own change returns; its client forgot, so an open there asks.
                    // (A client that does not say so was not waited for at all.)
                    || holder.busy_with(inodes) && (!holder.sends_forgotten || holder.forgotten.contains(seq))
            }
        },
        Wait::Registration { session } => {
            now >= state.grace_until || state.holders.get(session).is_some_and(|h| h.registered)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(p: &Promises, term: u64, session: u64) -> (u64, mpsc::Receiver<pb::CallbackDown>) {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let id = p.attach(term, session, tx, true);
        assert!(p.registered(term, session, id));
        (id, rx)
    }

    fn broken(rx: &mut mpsc::Receiver<pb::CallbackDown>) -> Option<pb::CallbackBreak> {
        match rx.try_recv().ok()?.msg? {
            pb::callback_down::Msg::Broken(b) => Some(b),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_change_breaks_other_holders_and_waits_for_their_ack() {
        let p = std::sync::Arc::new(Promises::new(Duration::from_secs(30)));
        let (s2, mut rx2) = stream(&p, 1, 2);
        let _ = stream(&p, 1, 1);
        let since = p.changes(1);
        assert!(p.promise(1, 2, &[10, 11], since));
        assert!(p.promise(1, 1, &[10], since));
        let writer = spawn_writer(&p, 1, 1, vec![10], vec![]);
        let message = loop {
            if let Some(b) = broken(&mut rx2) {
                break b;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(message.inodes, vec![10]);
        assert!(!writer.is_finished());
        p.ack(1, 2, s2, message.seq);
        tokio::time::timeout(Duration::from_secs(5), writer).await.expect("writer returns").expect("no panic");
        // The writer's own promise stays; the broken one is gone, the other one stays.
        assert_eq!(p.counts().1, 2);
    }

    #[tokio::test]
    async fn a_read_that_raced_a_change_gets_no_promise() {
        let p = Promises::new(Duration::from_secs(30));
        let _ = stream(&p, 1, 2);
        let since = p.changes(1);
        p.break_and_wait(1, 1, &[10], &[]).await;
        assert!(!p.promise(1, 2, &[10], since));
        assert!(p.promise(1, 2, &[11], since));
        assert!(p.promise(1, 2, &[10], p.changes(1)));
    }

    /// A writer's `break_and_wait` of `inodes` in `term`, on a task of its own.
    fn spawn_writer(
        p: &std::sync::Arc<Promises>,
        term: u64,
        mutator: u64,
        inodes: Vec<u64>,
        live: Vec<u64>,
    ) -> tokio::task::JoinHandle<u64> {
        let p = p.clone();
        tokio::spawn(async move { p.break_and_wait(term, mutator, &inodes, &live).await })
    }

    /// Waits for the next break sent on `rx`.
    async fn next_break(rx: &mut mpsc::Receiver<pb::CallbackDown>) -> pb::CallbackBreak {
        loop {
            if let Some(b) = broken(rx) {
                return b;
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_break_not_yet_acknowledged_keeps_the_promise_off_a_reply_to_the_holders_own_change() {
        let p = std::sync::Arc::new(Promises::new(Duration::from_secs(30)));
        let (s2, mut rx2) = stream(&p, 1, 2);
        assert!(p.promise(1, 2, &[10, 11], p.changes(1)));
        // Session 2 has a change naming directory 10 in flight, so session 1's change to 10
        // waits only until session 2's client (not its kernel) forgot.
        let own_change = p.begin_mutation(1, 2, vec![10]);
        let writer = spawn_writer(&p, 1, 1, vec![10], vec![]);
        let message = next_break(&mut rx2).await;
        p.forgotten(1, 2, s2, message.seq);
        tokio::time::timeout(Duration::from_secs(5), writer).await.expect("writer returns").expect("no panic");
        // Session 2's reply, decided after both changes: the break may reach the client after
        // it, so the directory is not promised with it.
        let since = p.changes(1);
        assert!(!p.promise(1, 2, &[12, 10], since));
        assert!(p.promise(1, 2, &[12], since));
        drop(own_change);
        p.ack(1, 2, s2, message.seq);
        assert!(p.promise(1, 2, &[12, 10], p.changes(1)));
    }

    #[tokio::test]
    async fn a_reply_to_a_change_is_not_promised_when_another_change_was_counted_since_it_was_proposed() {
        let p = Promises::new(Duration::from_secs(30));
        let _ = stream(&p, 1, 2);
        // Session 2 proposes a change to 10; session 1's change to 10, applied after it, is
        // counted first: session 2's reply lacks it, and no break for it reached session 2.
        let since = p.changes(1);
        p.break_and_wait(1, 1, &[10], &[]).await;
        let own = p.break_and_wait(1, 2, &[10], &[]).await;
        assert!(!p.promise_own(1, 2, &[10], since, own));
        // With only its own change counted since, the reply is promised.
        let since = p.changes(1);
        let own = p.break_and_wait(1, 2, &[10], &[]).await;
        assert!(p.promise_own(1, 2, &[10], since, own));
    }

    #[tokio::test]
    async fn a_break_sent_on_a_stream_still_registering_is_waited_for() {
        let p = std::sync::Arc::new(Promises::new(Duration::from_secs(30)));
        let (tx, mut rx) = mpsc::channel(STREAM_QUEUE);
        let id = p.attach(1, 2, tx, true);
        // The first batch of the registration is promised; a change breaks it before the last.
        assert!(p.promise(1, 2, &[10], p.changes(1)));
        let writer = spawn_writer(&p, 1, 1, vec![10], vec![]);
        let message = next_break(&mut rx).await;
        assert!(p.registered(1, 2, id));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the registration's end was taken for an acknowledgement");
        p.ack(1, 2, id, message.seq);
        tokio::time::timeout(Duration::from_secs(5), writer).await.expect("writer returns").expect("no panic");
    }

    #[tokio::test]
    async fn a_break_lost_with_its_stream_is_waited_for_until_the_next_registration_is_applied() {
        let p = std::sync::Arc::new(Promises::new(Duration::from_secs(30)));
        let (old, mut old_rx) = stream(&p, 1, 2);
        assert!(p.promise(1, 2, &[10], p.changes(1)));
        let writer = spawn_writer(&p, 1, 1, vec![10], vec![]);
        let _lost = next_break(&mut old_rx).await;
        p.detach(2, old);
        // The client comes back still caching 10, which its registration finds changed.
        let (tx, mut rx) = mpsc::channel(STREAM_QUEUE);
        let id = p.attach(1, 2, tx, true);
        p.break_one(1, 2, vec![10]);
        assert!(p.registered(1, 2, id));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "released before the client applied its registration's break");
        let message = next_break(&mut rx).await;
        p.ack(1, 2, id, message.seq);
        tokio::time::timeout(Duration::from_secs(5), writer).await.expect("writer returns").expect("no panic");
    }

    #[tokio::test]
    async fn a_busy_holder_that_does_not_say_when_its_cache_forgot_is_not_waited_for() {
        let p = Promises::new(Duration::from_secs(30));
        let (tx, _rx) = mpsc::channel(STREAM_QUEUE);
        let id = p.attach(1, 2, tx, false);
        assert!(p.registered(1, 2, id));
        assert!(p.promise(1, 2, &[10], p.changes(1)));
        let _busy = p.begin_mutation(1, 2, vec![10]);
        tokio::time::timeout(Duration::from_secs(5), p.break_and_wait(1, 1, &[10], &[]))
            .await
            .expect("no wait for such a busy holder");
    }

    #[tokio::test]
    async fn a_silent_holder_is_waited_for_until_its_lease_ends() {
        let p = Promises::new(Duration::from_millis(300));
        let (_, _rx) = stream(&p, 1, 2);
        assert!(p.promise(1, 2, &[10], p.changes(1)));
        let started = Instant::now();
        p.break_and_wait(1, 1, &[10], &[]).await;
        assert!(started.elapsed() >= Duration::from_millis(250), "waited {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_holder_with_its_own_mutation_on_the_inode_is_waited_for_until_its_client_forgot() {
        let p = std::sync::Arc::new(Promises::new(Duration::from_secs(30)));
        let (s2, mut rx2) = stream(&p, 2, 2);
        assert!(p.promise(2, 2, &[10, 11], p.changes(2)));
        let busy = p.begin_mutation(2, 2, vec![10]);
        let writer = spawn_writer(&p, 2, 1, vec![10, 11], vec![]);
        let message = next_break(&mut rx2).await;
        assert_eq!(message.inodes, vec![10, 11]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "returned before the holder's client forgot");
        p.forgotten(2, 2, s2, message.seq);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("no wait for a busy kernel")
            .expect("no panic");
        // A holder with nothing in flight is waited for until its kernel forgot as well.
        drop(busy);
        assert!(p.promise(2, 2, &[12], p.changes(2)));
        let writer = spawn_writer(&p, 2, 1, vec![12], vec![]);
        let message = next_break(&mut rx2).await;
        p.forgotten(2, 2, s2, message.seq);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "returned before the holder's kernel forgot");
        p.ack(2, 2, s2, message.seq);
        tokio::time::timeout(Duration::from_secs(5), writer).await.expect("writer returns").expect("no panic");
    }

    #[tokio::test]
    async fn a_new_term_waits_for_live_sessions_to_register() {
        let p = std::sync::Arc::new(Promises::new(Duration::from_secs(30)));
        let writer = spawn_writer(&p, 3, 1, vec![10], vec![1, 2]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished());
        let (tx, _rx) = mpsc::channel(STREAM_QUEUE);
        let id = p.attach(3, 2, tx, true);
        assert!(p.registered(3, 2, id));
        tokio::time::timeout(Duration::from_secs(5), writer).await.expect("writer returns").expect("no panic");
        // A new term forgets every promise.
        assert!(p.promise(3, 2, &[10], p.changes(3)));
        let _ = p.changes(4);
        assert_eq!(p.counts(), (0, 0));
    }
}
