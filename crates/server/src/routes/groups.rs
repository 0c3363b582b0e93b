//! A topic's consumer groups with members, pending, lag and oldest unacked age:
//! `GET /v1/envs/{env}/events/{event}/groups`.

use axum::Json;
use axum::extract::State;
use polybus::GroupInfo;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiPath, ApiResult, ErrorBody};
use crate::state::AppState;

/// The groups route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_groups))
}

/// One consumer group as the broker reports it; a field is `null` when the broker cannot tell it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupOut {
    /// Group name as given to subscribe.
    group: String,
    /// Members connected now.
    members: Option<u64>,
    /// Delivered to a member and not yet settled.
    pending: Option<u64>,
    /// Published and not yet delivered to this group.
    lag: Option<u64>,
    /// Age in milliseconds (since it was published) of the oldest delivered-but-unsettled message.
    oldest_unacked_ms: Option<u64>,
}

impl From<GroupInfo> for GroupOut {
    fn from(info: GroupInfo) -> Self {
        GroupOut {
            group: info.group,
            members: info.members,
            pending: info.pending,
            lag: info.lag,
            oldest_unacked_ms: info
                .oldest_unacked
                .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// A topic's groups.
#[derive(Debug, Serialize, ToSchema)]
pub struct Groups {
    /// The groups, by name.
    groups: Vec<GroupOut>,
}

#[utoipa::path(get, path = "/v1/envs/{env}/events/{event}/groups", tag = "groups",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
    ),
    responses(
        (status = 200, description = "The topic's consumer groups, as far as its broker can tell", body = Groups),
        (status = 400, description = "`VALIDATION_FAILED`, or `UNSUPPORTED` on a broker that cannot list groups (MQTT)", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED` or `CONSUME_FAILED`", body = ErrorBody),
    ))]
async fn list_groups(
    State(state): State<AppState>,
    ApiPath((env, event)): ApiPath<(String, String)>,
) -> ApiResult<Json<Groups>> {
    let groups = state.bus().groups(&env, &event).await?;
    Ok(Json(Groups { groups: groups.into_iter().map(GroupOut::from).collect() }))
}
