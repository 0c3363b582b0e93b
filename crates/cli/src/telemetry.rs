//! Logs and traces of the command line: log lines on stderr (text, or JSON for `serve
//! --log-format json`) with resolved secret values scrubbed, and, for `serve --otlp-endpoint`,
//! polybus's and the server's spans exported over OTLP.

use std::io::{IsTerminal, Write};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::cli::LogFormat;

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

/// What must be flushed before the process exits.
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<polybus::opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("polybus: exporting the last traces failed: {e}");
        }
    }
}

/// Logs to stderr at `default` (`warn`, or `info` for the server) unless `RUST_LOG` says
/// otherwise, in `format`; exports spans to the OTLP collector at `otlp` when given. rumqttc's
/// own warnings (reason codes of acks the MQTT adapter reads and handles) are left out.
pub fn init(default: &str, format: LogFormat, otlp: Option<&str>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},rumqttc=error")));
    let logs: Boxed = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(|| ScrubbedStderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(|| ScrubbedStderr)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![logs];
    let otlp = otlp.map(str::trim).filter(|url| !url.is_empty());
    #[cfg(feature = "otlp")]
    let provider = match otlp {
        Some(url) => {
            let (layer, provider) = otlp_layer(url)?;
            layers.push(layer);
            Some(provider)
        }
        None => None,
    };
    #[cfg(not(feature = "otlp"))]
    if otlp.is_some() {
        return Err("this build has no OTLP export (the `otlp` feature of polybus-cli is off)".into());
    }
    tracing_subscriber::registry().with(layers).init();
    Ok(Telemetry {
        #[cfg(feature = "otlp")]
        provider,
    })
}

/// The OpenTelemetry layer exporting spans of polybus and its server to `base` + `/v1/traces`.
#[cfg(feature = "otlp")]
fn otlp_layer(base: &str) -> Result<(Boxed, polybus::opentelemetry_sdk::trace::SdkTracerProvider), String> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    use polybus::opentelemetry::trace::TracerProvider as _;
    use polybus::opentelemetry_sdk::Resource;
    use polybus::opentelemetry_sdk::trace::SdkTracerProvider;

    let base = base.trim_end_matches('/');
    let endpoint = if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(format!("--otlp-endpoint must be an http:// or https:// URL, got `{base}`"));
    }
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| format!("cannot export traces to {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("polybus").build())
        .build();
    let layer = polybus::tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("polybus"))
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| meta.target().starts_with("polybus")))
        .boxed();
    Ok((layer, provider))
}

/// Stderr for log lines, with every secret value a bus resolved replaced by its reference
/// (client libraries log endpoints themselves, which may hold resolved values).
struct ScrubbedStderr;

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The formatter writes each event in one call, so a value is never split across calls.
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(polybus::scrub_log(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
