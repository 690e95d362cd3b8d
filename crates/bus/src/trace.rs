//! W3C trace context across the bus: injected into NATS headers and the
//! envelope on append, extracted as the parent of the consumer's span.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's context into `headers`; returns the
/// `traceparent` value when there is a sampled or valid span.
pub(crate) fn inject_current(headers: &mut async_nats::HeaderMap) -> Option<String> {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    headers.get("traceparent").map(|v| v.as_str().to_owned())
}

/// Makes the context carried in `headers` the parent of `span`.
pub(crate) fn set_parent_from(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(headers) = headers {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn trace_id(span: &tracing::Span) -> opentelemetry::trace::TraceId {
        span.context().span().span_context().trace_id()
    }

    #[test]
    fn consumer_span_continues_the_producer_trace() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("grpc.request");
            let mut headers = async_nats::HeaderMap::new();
            let traceparent = request.in_scope(|| inject_current(&mut headers));
            let traceparent = traceparent.expect("a traceparent is written under a span");
            let producer_trace = trace_id(&request);
            assert!(
                traceparent.contains(&producer_trace.to_string()),
                "{traceparent}"
            );

            let consumer = tracing::info_span!("projection.event");
            set_parent_from(&consumer, Some(&headers));
            assert_eq!(trace_id(&consumer), producer_trace);

            let unrelated = tracing::info_span!("other");
            assert_ne!(trace_id(&unrelated), producer_trace);
        });
    }
}
