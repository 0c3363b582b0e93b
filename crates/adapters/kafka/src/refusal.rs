//! Connections a broker refused for good: a TLS handshake that failed (a certificate the CA
//! does not vouch for, a port that does not speak TLS) or SASL credentials refused.
//!
//! librdkafka retries such connections for ever and reports them only through its error
//! callback, so a request waiting on them would just time out with no reason. The clients of
//! one env share a [`Refusals`]: the callback records what it reports, and the transport's
//! requests fail at once with that reason instead of waiting.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::watch;

use crate::config::Coded;

/// How long a refusal counts as current after librdkafka reported it. librdkafka reports the
/// same failure of a broker again at most every 30 s, and it keeps failing meanwhile.
const CURRENT_FOR: Duration = Duration::from_secs(40);

/// A connection librdkafka reported refused: its code and librdkafka's text, which names the
/// broker (`ssl://host:port/id: SSL handshake failed: …`).
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    code: RDKafkaErrorCode,
    reason: String,
    at: Instant,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reason = self.reason.trim_end_matches('.');
        if self.code == RDKafkaErrorCode::SSL {
            write!(
                f,
                "TLS handshake refused: {reason}; check that `tls.ca` or `tls.caFile` holds the CA that \
                 signed the broker's certificate, and that the port speaks TLS"
            )
        } else {
            write!(
                f,
                "SASL authentication refused: {reason}; check `sasl.mechanism`, `sasl.username` and \
                 `sasl.password`"
            )
        }
    }
}

impl std::error::Error for Refusal {}

impl Coded for Refusal {
    fn code(&self) -> Option<RDKafkaErrorCode> {
        Some(self.code)
    }
}

/// True for the codes that mean a connection was refused for good (no retry cures it).
fn is_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed
    )
}

/// The latest refusal the clients of one env reported, and a way to wait for the next one.
#[derive(Debug)]
pub(crate) struct Refusals {
    latest: watch::Sender<Option<Refusal>>,
}

impl Refusals {
    /// None reported yet.
    pub fn new() -> Arc<Refusals> {
        Arc::new(Refusals { latest: watch::Sender::new(None) })
    }

    /// Records what librdkafka's error callback reported, when it is a refusal.
    pub fn report(&self, error: &KafkaError, reason: &str) {
        if let Some(code) = error.rdkafka_error_code().filter(|code| is_refusal(*code)) {
            self.latest.send_replace(Some(Refusal { code, reason: reason.to_owned(), at: Instant::now() }));
        }
    }

    /// Forgets the refusal: a request went through.
    pub fn clear(&self) {
        // A read first: every publish that goes through calls this.
        if self.latest.borrow().is_some() {
            self.latest.send_if_modified(|latest| latest.take().is_some());
        }
    }

    /// The refusal reported within the last [`CURRENT_FOR`], unless a request went through since.
    pub fn current(&self) -> Option<Refusal> {
        self.latest.borrow().clone().filter(|refusal| refusal.at.elapsed() < CURRENT_FOR)
    }

    /// Resolves with the next refusal reported after this call (never, if none is).
    pub fn next(&self) -> impl Future<Output = Refusal> + Send + 'static {
        let mut latest = self.latest.subscribe();
        async move {
            loop {
                if latest.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if let Some(refusal) = latest.borrow_and_update().clone() {
                    return refusal;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refusals_are_recorded_awaited_and_cleared() {
        let refusals = Refusals::new();
        let next = refusals.next();
        refusals.report(&KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        assert!(refusals.current().is_none(), "a transport failure is no refusal");
        refusals.report(
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "ssl://b:9093/bootstrap: SSL handshake failed: certificate verify failed",
        );
        let refusal = tokio::time::timeout(Duration::from_secs(1), next).await.expect("reported");
        let text = refusal.to_string();
        assert!(text.contains("b:9093") && text.contains("TLS") && text.contains("tls.caFile"), "{text}");
        assert!(refusals.current().is_some());
        refusals.clear();
        assert!(refusals.current().is_none());
        refusals.report(&KafkaError::Global(RDKafkaErrorCode::Authentication), "SASL authentication error");
        assert!(refusals.current().is_some_and(|r| r.to_string().contains("sasl.password")));
    }
}
