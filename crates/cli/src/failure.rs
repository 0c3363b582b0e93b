//! What a failed command reports: a stable code, one line of explanation, an exit code.

use std::borrow::Cow;
use std::fmt;
use std::process::ExitCode;

/// Exit code of a failed command.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of `consume` when its timeout came before `--count` messages.
pub const EXIT_TIMEOUT: u8 = 3;
/// Exit code when interrupted (Ctrl-C) before the work was done.
pub const EXIT_INTERRUPTED: u8 = 130;

/// A failed command.
#[derive(Debug)]
pub struct Failure {
    code: Cow<'static, str>,
    message: String,
    exit: u8,
    quiet: bool,
}

impl Failure {
    /// A failure with exit code 1.
    pub fn new(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Failure { code: code.into(), message: message.into(), exit: EXIT_FAILURE, quiet: false }
    }

    /// Sets the exit code.
    pub fn with_exit(mut self, exit: u8) -> Self {
        self.exit = exit;
        self
    }

    /// A failure that prints nothing (stdout was closed by the reader).
    pub fn quiet() -> Self {
        Failure {
            code: Cow::Borrowed("OUTPUT_CLOSED"),
            message: String::new(),
            exit: EXIT_FAILURE,
            quiet: true,
        }
    }

    /// Names the file a validation problem is in.
    pub fn in_file(mut self, file: &str) -> Self {
        if self.code == "VALIDATION_FAILED" {
            self.message = format!("{file}: {}", self.message);
        }
        self
    }

    /// The stable code, e.g. `BROKER_NOT_FOUND`.
    #[cfg(test)]
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Prints the failure as one `error: …` line on stderr and returns the exit code.
    pub fn report(&self) -> ExitCode {
        if !self.quiet {
            eprintln!("error: {self}");
        }
        ExitCode::from(self.exit)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line whatever the source said: a multi-line message would break `2>&1 | grep`.
        let message: Vec<&str> = self.message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        // Escaped: a message may quote what a server or a definition file holds.
        let message = crate::output::shown(&message.join(" "), usize::MAX);
        write!(f, "{}: {}", self.code, message)
    }
}

impl From<polybus::Error> for Failure {
    fn from(error: polybus::Error) -> Self {
        let message = match &error {
            polybus::Error::Validation(v) => v.to_string(),
            other => other.to_string(),
        };
        Failure::new(error.code(), message)
    }
}

impl From<polybus::core::ValidationError> for Failure {
    fn from(error: polybus::core::ValidationError) -> Self {
        polybus::Error::from(error).into()
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, Failure>;

/// Names the file a validation problem came from, on any result.
pub trait InFile<T> {
    /// See [`Failure::in_file`].
    fn in_file(self, file: &str) -> CliResult<T>;
}

impl<T, E: Into<Failure>> InFile<T> for Result<T, E> {
    fn in_file(self, file: &str) -> CliResult<T> {
        self.map_err(|e| e.into().in_file(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_failures_name_the_file_in_one_line() {
        let error = polybus::core::ValidationError::in_env("dev", "config.port", "invalid type:\n  string");
        let failure = Failure::from(error).in_file("broker.yaml");
        assert_eq!(
            failure.to_string(),
            "VALIDATION_FAILED: broker.yaml: env `dev`: field `config.port`: invalid type: string"
        );
    }

    #[test]
    fn other_failures_keep_their_message() {
        let failure = Failure::from(polybus::Error::BrokerNotFound("bus".into())).in_file("x.yaml");
        assert_eq!(failure.to_string(), "BROKER_NOT_FOUND: broker `bus` not found");
    }
}
