//! `polybus groups --env SLUG EVENT`: a topic's consumer groups with members, pending, lag and
//! oldest unacked age, locally or through `--server`.

use polybus::GroupInfo;

use super::{Context, Source};
use crate::cli::GroupsArgs;
use crate::failure::CliResult;
use crate::output;

/// Runs `polybus groups`.
pub async fn run(ctx: &Context, args: GroupsArgs) -> CliResult {
    let groups = match ctx.source() {
        Source::Remote(client) => client.groups(&args.env, &args.event).await?,
        Source::Local => {
            let bus = ctx.bus().await?;
            let groups = bus.groups(&args.env, &args.event).await;
            let _ = bus.close().await;
            groups?
        }
    };
    if ctx.json() {
        for group in &groups {
            output::line(output::compact(group)?)?;
        }
        return Ok(());
    }
    output::table(&["GROUP", "MEMBERS", "PENDING", "LAG", "OLDEST-UNACKED"], &rows(&groups))
}

/// One table row per group; `-` where the broker cannot tell.
fn rows(groups: &[GroupInfo]) -> Vec<Vec<String>> {
    let shown = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                shown(g.members),
                shown(g.pending),
                shown(g.lag),
                g.oldest_unacked.map_or_else(|| "-".to_owned(), |age| format!("{:.1}s", age.as_secs_f64())),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn what_a_broker_cannot_tell_is_a_dash() {
        let known = GroupInfo {
            members: Some(2),
            pending: Some(1),
            lag: Some(40),
            oldest_unacked: Some(Duration::from_millis(1500)),
            ..GroupInfo::named("billing")
        };
        assert_eq!(
            rows(&[known, GroupInfo::named("audit")]),
            [["billing", "2", "1", "40", "1.5s"], ["audit", "-", "-", "-", "-"],]
        );
    }
}
