//! Which offset of each assigned partition is safe to commit.
//!
//! Deliveries are acked in any order; a partition's committed offset only moves past a
//! message once it and every earlier message fetched from that partition are settled. The
//! commit also carries, as Kafka offset metadata, how many times each still-unsettled message
//! was handed out, so the member that gets the partition next counts attempts on.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Which of a subscription's two topics a partition belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Source {
    /// The topic itself.
    Main,
    /// The group's retry topic.
    Retry,
}

/// One message's place: partition, offset and the assignment it was fetched under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Slot {
    pub source: Source,
    pub partition: i32,
    pub offset: i64,
    /// Changes every time the partition is assigned; a slot of an older epoch is stale.
    pub epoch: u64,
}

/// An offset to commit, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Commit {
    pub source: Source,
    pub partition: i32,
    pub offset: i64,
    pub metadata: String,
}

/// Prefix of the offset metadata polybus writes.
const METADATA_PREFIX: &str = "polybus-deliveries:";
/// Kafka's default `offset.metadata.max.bytes` is 4096; stay well below.
const METADATA_MAX: usize = 2048;

#[derive(Debug, Default)]
struct Partition {
    epoch: u64,
    /// Fetched and not yet settled.
    pending: BTreeSet<i64>,
    /// One past the highest offset fetched.
    next: Option<i64>,
    /// The offset last committed (or being committed).
    committed: Option<i64>,
    /// Offset → times handed out, for messages not yet settled.
    deliveries: BTreeMap<i64, u32>,
    /// Handed out something since the last commit: its count is worth committing.
    counted: bool,
}

impl Partition {
    fn commit_point(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }

    fn metadata(&self, from: i64) -> String {
        let mut out = String::from(METADATA_PREFIX);
        for (offset, count) in self.deliveries.range(from..) {
            let entry = format!("{offset}={count},");
            if out.len() + entry.len() > METADATA_MAX {
                break;
            }
            out.push_str(&entry);
        }
        if out.ends_with(',') {
            out.pop();
        }
        out
    }

    fn commit(&mut self, source: Source, partition: i32) -> Option<Commit> {
        let offset = self.commit_point()?;
        self.committed = Some(offset);
        self.counted = false;
        self.deliveries = self.deliveries.split_off(&offset);
        Some(Commit { source, partition, offset, metadata: self.metadata(offset) })
    }
}

/// Offsets of every partition assigned to one member.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    partitions: HashMap<(Source, i32), Partition>,
    epochs: u64,
}

impl Offsets {
    /// Starts tracking a newly assigned partition; `metadata` is what its last commit carried.
    pub fn assign(&mut self, source: Source, partition: i32, metadata: &str) {
        self.epochs += 1;
        let deliveries = parse_metadata(metadata);
        self.partitions.insert(
            (source, partition),
            Partition { epoch: self.epochs, deliveries, ..Partition::default() },
        );
    }

    /// Stops tracking a revoked partition; returns what is safe to commit for it.
    pub fn revoke(&mut self, source: Source, partition: i32) -> Option<Commit> {
        let mut state = self.partitions.remove(&(source, partition))?;
        state.commit(source, partition)
    }

    /// The partitions currently assigned.
    pub fn assigned(&self) -> impl Iterator<Item = (Source, i32)> + '_ {
        self.partitions.keys().copied()
    }

    /// Records a fetched message; returns its slot and how often it was handed out before,
    /// or `None` when the partition is not assigned (a message left over from a revocation).
    pub fn fetched(&mut self, source: Source, partition: i32, offset: i64) -> Option<(Slot, u32)> {
        let state = self.partitions.get_mut(&(source, partition))?;
        if state.next.is_some_and(|n| offset < n) {
            // Fetched twice within one assignment: the first copy is already on its way.
            return None;
        }
        state.pending.insert(offset);
        state.next = Some(offset + 1);
        let before = state.deliveries.get(&offset).copied().unwrap_or(0);
        Some((Slot { source, partition, offset, epoch: state.epoch }, before))
    }

    /// True while `slot`'s partition is still assigned under the same epoch.
    pub fn is_current(&self, slot: &Slot) -> bool {
        self.partitions.get(&(slot.source, slot.partition)).is_some_and(|p| p.epoch == slot.epoch)
    }

    /// Records that `slot` was handed out as delivery number `attempt`.
    pub fn handed_out(&mut self, slot: &Slot, attempt: u32) {
        if let Some(state) = self.current(slot) {
            state.deliveries.insert(slot.offset, attempt);
            state.counted = true;
        }
    }

    /// Marks `slot` settled; false when it is stale (its partition was revoked meanwhile).
    pub fn settle(&mut self, slot: &Slot) -> bool {
        match self.current(slot) {
            Some(state) => {
                state.pending.remove(&slot.offset);
                state.deliveries.remove(&slot.offset);
                true
            }
            None => false,
        }
    }

    /// Commits that, with `counts`, record new delivery counts and, with `moved`, move a
    /// partition forward, since the last call. Counts are committed soon after they change, not
    /// only at a revocation: some brokers refuse commits once a rebalance has begun.
    pub fn progress(&mut self, moved: bool, counts: bool) -> Vec<Commit> {
        let mut out = Vec::new();
        for (&(source, partition), state) in &mut self.partitions {
            let point = state.commit_point();
            if point.is_some() && ((counts && state.counted) || (moved && point != state.committed)) {
                out.extend(state.commit(source, partition));
            }
        }
        out
    }

    /// True when some delivery count is not committed yet.
    pub fn has_counts(&self) -> bool {
        self.partitions.values().any(|p| p.counted)
    }

    /// Commits for every partition that has fetched anything, progress or not (before leaving).
    pub fn everything(&mut self) -> Vec<Commit> {
        self.partitions
            .iter_mut()
            .filter_map(|(&(source, partition), state)| state.commit(source, partition))
            .collect()
    }

    /// A commit failed: forget that it happened, so the next round commits again.
    pub fn commit_failed(&mut self, source: Source, partition: i32) {
        if let Some(state) = self.partitions.get_mut(&(source, partition)) {
            state.committed = None;
        }
    }

    fn current(&mut self, slot: &Slot) -> Option<&mut Partition> {
        self.partitions.get_mut(&(slot.source, slot.partition)).filter(|p| p.epoch == slot.epoch)
    }
}

/// Reads `polybus-deliveries:12=1,15=2`; anything else (another client's metadata) is empty.
fn parse_metadata(metadata: &str) -> BTreeMap<i64, u32> {
    let Some(list) = metadata.strip_prefix(METADATA_PREFIX) else {
        return BTreeMap::new();
    };
    list.split(',')
        .filter_map(|entry| {
            let (offset, count) = entry.split_once('=')?;
            Some((offset.parse().ok()?, count.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets() -> Offsets {
        let mut o = Offsets::default();
        o.assign(Source::Main, 0, "");
        o
    }

    fn fetch(o: &mut Offsets, offsets: impl IntoIterator<Item = i64>) -> Vec<Slot> {
        offsets.into_iter().map(|n| o.fetched(Source::Main, 0, n).expect("assigned").0).collect()
    }

    fn committed(o: &mut Offsets) -> Option<i64> {
        o.progress(true, true).into_iter().map(|c| c.offset).next_back()
    }

    #[test]
    fn commit_waits_for_every_earlier_message() {
        let mut o = offsets();
        let slots = fetch(&mut o, 10..15);
        assert_eq!(committed(&mut o), Some(10), "nothing settled: commit stays at the first fetched");
        assert!(o.settle(&slots[2]) && o.settle(&slots[1]));
        assert_eq!(committed(&mut o), None, "10 is still unsettled: no progress");
        assert!(o.settle(&slots[0]));
        assert_eq!(committed(&mut o), Some(13), "10..=12 settled");
        o.settle(&slots[4]);
        o.settle(&slots[3]);
        assert_eq!(committed(&mut o), Some(15));
        assert_eq!(committed(&mut o), None, "no progress, no commit");
    }

    #[test]
    fn a_new_delivery_count_is_committed_without_progress() {
        let mut o = offsets();
        let slots = fetch(&mut o, 0..2);
        assert_eq!(committed(&mut o), Some(0));
        o.handed_out(&slots[0], 1);
        let commit = o.progress(false, true).pop().expect("the count is committed");
        assert_eq!((commit.offset, commit.metadata.as_str()), (0, "polybus-deliveries:0=1"));
        assert!(o.progress(true, true).is_empty());
        o.settle(&slots[0]);
        assert!(o.progress(false, true).is_empty(), "progress alone waits for its round");
        assert_eq!(committed(&mut o), Some(1));
    }

    #[test]
    fn gaps_in_offsets_do_not_block_commits() {
        let mut o = offsets();
        let slots = fetch(&mut o, [3, 7, 8]);
        for s in &slots {
            o.settle(s);
        }
        assert_eq!(committed(&mut o), Some(9));
    }

    #[test]
    fn revoked_partitions_make_old_slots_stale() {
        let mut o = offsets();
        let slots = fetch(&mut o, 0..3);
        o.settle(&slots[0]);
        o.handed_out(&slots[1], 1);
        let commit = o.revoke(Source::Main, 0).expect("a commit");
        assert_eq!((commit.offset, commit.metadata.as_str()), (1, "polybus-deliveries:1=1"));
        assert!(!o.settle(&slots[1]), "a slot of a revoked partition is stale");
        assert!(o.fetched(Source::Main, 0, 1).is_none(), "not assigned any more");

        o.assign(Source::Main, 0, &commit.metadata);
        let (again, before) = o.fetched(Source::Main, 0, 1).expect("assigned again");
        assert_eq!(before, 1, "the next owner knows it was handed out once");
        assert!(!o.is_current(&slots[1]) && o.is_current(&again));
    }

    #[test]
    fn metadata_lists_only_unsettled_deliveries_and_stays_small() {
        let mut o = offsets();
        let slots = fetch(&mut o, 0..1000);
        for (i, s) in slots.iter().enumerate() {
            o.handed_out(s, 2);
            if i % 2 == 0 {
                o.settle(s);
            }
        }
        let commit = o.everything().pop().expect("a commit");
        assert_eq!(commit.offset, 1);
        assert!(commit.metadata.starts_with("polybus-deliveries:1=2,3=2,5=2"), "{}", commit.metadata);
        assert!(commit.metadata.len() <= METADATA_MAX);
        assert_eq!(parse_metadata("from another client"), BTreeMap::new());
    }
}
