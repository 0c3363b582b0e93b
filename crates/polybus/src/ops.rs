//! Groups and lag, replay and message query: a topic's stored state, read or moved through
//! its adapter. An adapter that cannot do one answers `UNSUPPORTED`, naming its broker type.

use polybus_core::ops::{QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX};
use polybus_core::{Error, GroupInfo, MessageQuery, ReplayFrom, Result, StoredMessage, ValidationError};

use crate::Bus;
use crate::bus::Resolved;

impl Bus {
    /// The consumer groups of `event` in `env`, with members, pending, lag and oldest unacked age.
    pub async fn groups(&self, env: &str, event: &str) -> Result<Vec<GroupInfo>> {
        let route = self.resolve(env, event).await?;
        let mut groups = route.transport.groups(&route.spec).await.map_err(|e| named(e, &route))?;
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(groups)
    }

    /// Moves `group` of `event` in `env` so its next deliveries start at `from`.
    pub async fn replay(&self, env: &str, event: &str, group: &str, from: ReplayFrom) -> Result<()> {
        polybus_core::tag::check_tag(group).map_err(|e| ValidationError::field("group", e))?;
        let route = self.resolve(env, event).await?;
        route.transport.replay(&route.spec, group, from).await.map_err(|e| named(e, &route))?;
        tracing::info!(env, event, group, ?from, "replayed");
        Ok(())
    }

    /// Reads stored messages of `event` in `env` back without consuming them, oldest first.
    pub async fn messages(&self, env: &str, event: &str, query: MessageQuery) -> Result<Vec<StoredMessage>> {
        let mut query = query;
        if query.limit == 0 {
            query.limit = QUERY_LIMIT_DEFAULT;
        }
        if query.limit > QUERY_LIMIT_MAX {
            return Err(ValidationError::field("limit", format!("at most {QUERY_LIMIT_MAX}")).into());
        }
        if let (Some(since), Some(until)) = (query.since, query.until)
            && since >= until
        {
            return Err(ValidationError::field("until", "must be later than since").into());
        }
        let route = self.resolve(env, event).await?;
        route.transport.messages(&route.spec, &query).await.map_err(|e| named(e, &route))
    }
}

/// Names the broker type in an adapter's `UNSUPPORTED` answer.
fn named(error: Error, route: &Resolved) -> Error {
    match error {
        Error::Unsupported { broker_type, what } if broker_type.is_empty() => {
            Error::Unsupported { broker_type: route.broker_type.to_string(), what }
        }
        other => other,
    }
}
