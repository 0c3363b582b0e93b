//! What a topic and its groups are called on SQS.
//!
//! A topic with native name `N` has the base queue `N` and one queue `N--G` per group `G`
//! (with `.fifo` at the end for FIFO topics). SQS queue names are at most 80 characters of
//! `[A-Za-z0-9_-]`: any other character becomes `_`, and a name that had to change or be
//! shortened gets `-` and a hash of the original appended, so two native names never share a queue.

/// Longest queue name SQS accepts, `.fifo` included.
pub const MAX_QUEUE_NAME: usize = 80;
/// The suffix SQS requires on FIFO queue names.
pub const FIFO_SUFFIX: &str = ".fifo";
/// Separates a topic's name from a group's in the group's queue name.
pub const GROUP_SEPARATOR: &str = "--";
/// Room a name keeps for `-` and an 8-digit hash.
const HASH_ROOM: usize = 9;

/// The queue names of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicQueues {
    stem: String,
    fifo: bool,
}

impl TopicQueues {
    /// The queues of native name `native`; FIFO when asked or when the name ends in `.fifo`.
    pub fn new(native: &str, fifo: bool) -> Self {
        let (native, fifo) = match native.strip_suffix(FIFO_SUFFIX) {
            Some(stripped) => (stripped, true),
            None => (native, fifo),
        };
        let max = max_stem(fifo);
        let clean: String = native.chars().map(|c| if valid_char(c) { c } else { '_' }).collect();
        let stem = if clean == native && clean.len() <= max { clean } else { hashed(&clean, native, max) };
        TopicQueues { stem, fifo }
    }

    /// True for FIFO queues.
    pub fn fifo(&self) -> bool {
        self.fifo
    }

    /// The base queue: `<native>` (`<native>.fifo`).
    pub fn base(&self) -> String {
        self.with_suffix(self.stem.clone())
    }

    /// The queue of `group`: `<native>--<group>` (`.fifo`), shortened with a hash when too long.
    pub fn group(&self, group: &str) -> String {
        let full = format!("{}{GROUP_SEPARATOR}{group}", self.stem);
        let clean: String = full.chars().map(|c| if valid_char(c) { c } else { '_' }).collect();
        let max = max_stem(self.fifo);
        let stem = if clean == full && clean.len() <= max { clean } else { hashed(&clean, &full, max) };
        self.with_suffix(stem)
    }

    /// What every group queue name of this topic starts with (for `ListQueues`).
    pub fn group_prefix(&self) -> String {
        let mut prefix = format!("{}{GROUP_SEPARATOR}", self.stem);
        prefix.truncate(max_stem(self.fifo) - HASH_ROOM);
        prefix
    }

    fn with_suffix(&self, stem: String) -> String {
        if self.fifo { stem + FIFO_SUFFIX } else { stem }
    }
}

/// The last path segment of a queue URL: the queue's name.
pub fn queue_name(url: &str) -> &str {
    url.trim_end_matches('/').rsplit('/').next().unwrap_or(url)
}

/// True when a queue URL names a FIFO queue.
pub fn is_fifo_url(url: &str) -> bool {
    queue_name(url).ends_with(FIFO_SUFFIX)
}

/// A value SQS accepts as `MessageGroupId` / `MessageDeduplicationId` (1 to 128 visible ASCII
/// characters): `value` itself when it is one, else a stable hash of it.
pub fn fifo_id(value: &str) -> String {
    if (1..=128).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic()) {
        value.to_owned()
    } else {
        format!("h-{:016x}{:016x}", fnv1a(value, 0xcbf2_9ce4_8422_2325), fnv1a(value, 0x6c62_272e_07bb_0142))
    }
}

fn max_stem(fifo: bool) -> usize {
    if fifo { MAX_QUEUE_NAME - FIFO_SUFFIX.len() } else { MAX_QUEUE_NAME }
}

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// `clean` (ASCII) cut to leave room for `-<hash of original>`, within `max` characters.
fn hashed(clean: &str, original: &str, max: usize) -> String {
    let keep = clean.len().min(max - HASH_ROOM);
    format!("{}-{:08x}", &clean[..keep], fnv1a(original, 0xcbf2_9ce4_8422_2325) as u32)
}

/// FNV-1a: stable across processes and versions, unlike the standard library's hasher.
fn fnv1a(value: &str, basis: u64) -> u64 {
    value.bytes().fold(basis, |hash, b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_kept() {
        let q = TopicQueues::new("orders", false);
        assert_eq!(
            (q.base(), q.group("billing"), q.group_prefix()),
            ("orders".into(), "orders--billing".into(), "orders--".into())
        );
    }

    #[test]
    fn fifo_names_end_in_fifo_once() {
        let q = TopicQueues::new("orders", true);
        assert_eq!((q.base(), q.group("billing")), ("orders.fifo".into(), "orders--billing.fifo".into()));
        let q = TopicQueues::new("orders.fifo", false);
        assert!(q.fifo());
        assert_eq!(q.base(), "orders.fifo");
    }

    #[test]
    fn other_characters_are_replaced_and_hashed() {
        let dotted = TopicQueues::new("orders.eu", false).base();
        let underscored = TopicQueues::new("orders_eu", false).base();
        assert!(dotted.starts_with("orders_eu-") && dotted.len() == "orders_eu-".len() + 8, "{dotted}");
        assert_eq!(underscored, "orders_eu");
    }

    #[test]
    fn long_names_fit_and_keep_the_group_prefix() {
        let q = TopicQueues::new(&"t".repeat(60), true);
        let group = q.group(&"g".repeat(40));
        assert_eq!(group.len(), MAX_QUEUE_NAME);
        assert!(group.starts_with(&q.group_prefix()), "{group}");
        assert_ne!(group, q.group(&"g".repeat(41)));
        assert!(TopicQueues::new(&"x".repeat(200), false).base().len() <= MAX_QUEUE_NAME);
    }

    #[test]
    fn fifo_ids_are_kept_when_valid_and_hashed_otherwise() {
        assert_eq!(fifo_id("customer-42"), "customer-42");
        let hashed = fifo_id("kunde äöü");
        assert!(hashed.starts_with("h-") && hashed.len() == 34);
        assert_eq!(hashed, fifo_id("kunde äöü"));
        assert_ne!(fifo_id(""), "");
    }

    #[test]
    fn queue_names_come_from_urls() {
        assert_eq!(queue_name("http://127.0.0.1:4566/123456789012/orders--b.fifo"), "orders--b.fifo");
        assert!(is_fifo_url("https://sqs.eu-west-1.amazonaws.com/1/x.fifo"));
    }
}
