//! Logs and traces. Logs are JSON lines on stdout through `tracing`; when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans also go out over OTLP/HTTP,
//! continuing the `traceparent` a publisher put on the message.
//!
//! Nothing secret is ever a field: the config's `Secret` prints `***`, the
//! HaloPSA client never logs headers, bodies of token responses or URLs
//! with credentials.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;

/// Flushes pending spans when dropped (keep it alive in `main`).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry: flushing spans failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber: JSON logs filtered by `RUST_LOG`
/// (default `info`), plus OTLP traces when configured.
pub fn init(service: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_writer(std::io::stdout);
    let provider = otlp_provider(service);
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    let result = match &provider {
        Some(p) => {
            let tracer = p.tracer(service.to_string());
            registry
                .with(tracing_opentelemetry::layer().with_tracer(tracer))
                .try_init()
        }
        None => registry.try_init(),
    };
    if let Err(e) = result {
        eprintln!("telemetry: a subscriber was already installed: {e}");
    }
    TelemetryGuard { provider }
}

/// Writes each log line with its control characters escaped (`\n` as the
/// two characters `\` `n`, ESC as `\u{1b}`, …), the final newline kept: a
/// value given by a user (a sign-in name with a newline or a terminal
/// escape) can neither start a forged line nor drive the terminal.
/// tracing-subscriber's plain-text format writes a `%field` as given and
/// has no option for this, hence these few lines; the formatter hands one
/// whole event to each `write`.
pub struct EscapingWriter<W>(pub W);

/// `line` with every control character escaped but a final `\n`.
pub fn escape_control(line: &str) -> String {
    let (body, end) = match line.strip_suffix('\n') {
        Some(b) => (b, "\n"),
        None => (line, ""),
    };
    let mut out = String::with_capacity(body.len() + 1);
    for c in body.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push_str(end);
    out
}

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(escape_control(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// For the operator's tool: OTLP traces when configured, and logs on
/// stderr only when `RUST_LOG` is set (stdout is the command's output),
/// as plain text with control characters escaped ([`EscapingWriter`]).
pub fn init_cli(service: &str) -> TelemetryGuard {
    let provider = otlp_provider(service);
    let fmt = std::env::var_os("RUST_LOG").map(|_| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| EscapingWriter(std::io::stderr()))
            .with_filter(EnvFilter::from_default_env())
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service.to_string()))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    TelemetryGuard { provider }
}

fn otlp_provider(service: &str) -> Option<SdkTracerProvider> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()?;
    if endpoint.trim().is_empty() {
        return None;
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("telemetry: OTLP exporter for {endpoint} not started: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct MapExtractor<'a>(&'a HashMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The current span's W3C `traceparent` (and `tracestate`), when tracing
/// is exported and a span is active.
pub fn current_traceparent() -> Option<(String, Option<String>)> {
    let cx = tracing::Span::current().context();
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(&mut map));
    let tp = map.remove("traceparent")?;
    Some((tp, map.remove("tracestate").filter(|s| !s.is_empty())))
}

/// Makes `span` a child of the trace in `traceparent`/`tracestate`.
pub fn continue_trace(
    span: &tracing::Span,
    traceparent: Option<String>,
    tracestate: Option<String>,
) {
    let Some(tp) = traceparent else { return };
    let mut map = HashMap::from([("traceparent".to_string(), tp)]);
    if let Some(ts) = tracestate {
        map.insert("tracestate".to_string(), ts);
    }
    let cx = TraceContextPropagator::new().extract(&MapExtractor(&map));
    // Fails only when no OpenTelemetry layer is installed: nothing to do.
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod escape_tests {
    use super::escape_control;

    #[test]
    fn control_characters_cannot_start_a_line_or_drive_a_terminal() {
        assert_eq!(
            escape_control("WARN sign-in failed user=eve\nINFO signed in user=root\n"),
            "WARN sign-in failed user=eve\\nINFO signed in user=root\n"
        );
        assert_eq!(escape_control("a\u{1b}[31mb\r\tc"), "a\\u{1b}[31mb\\r\\tc");
        assert_eq!(escape_control("plain é ✓\n"), "plain é ✓\n");
    }
}
