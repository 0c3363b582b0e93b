//! Pub/Sub resource names for polybus topics and groups.
//!
//! A native name is a topic id (`orders`) in the env's project, or a full topic path
//! (`projects/other/topics/orders`) used as it is. A group's subscription is
//! `projects/<project>/subscriptions/<topic id>--<group>`.

/// Builds resource names in one project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    project: String,
}

impl Names {
    /// Names in `project` (an id such as `my-project`).
    pub fn new(project: impl Into<String>) -> Self {
        Names { project: project.into() }
    }

    /// `projects/<project>`.
    pub fn project(&self) -> String {
        format!("projects/{}", self.project)
    }

    /// The topic path of a native name.
    pub fn topic(&self, native: &str) -> String {
        if native.starts_with("projects/") {
            native.to_owned()
        } else {
            format!("projects/{}/topics/{native}", self.project)
        }
    }

    /// The subscription path of `group` on the topic `native`.
    pub fn subscription(&self, native: &str, group: &str) -> String {
        format!("projects/{}/subscriptions/{}--{group}", self.project, topic_id(native))
    }
}

/// The last segment of a topic path (the whole name when it is an id).
pub fn topic_id(native: &str) -> &str {
    native.rsplit('/').next().unwrap_or(native)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_live_in_the_env_project_and_paths_stay_as_they_are() {
        let names = Names::new("polybus-test");
        assert_eq!(names.topic("orders"), "projects/polybus-test/topics/orders");
        assert_eq!(names.topic("projects/other/topics/orders"), "projects/other/topics/orders");
        assert_eq!(
            names.subscription("projects/other/topics/orders", "billing"),
            "projects/polybus-test/subscriptions/orders--billing"
        );
        assert_eq!(
            names.subscription("orders", "billing"),
            "projects/polybus-test/subscriptions/orders--billing"
        );
    }
}
