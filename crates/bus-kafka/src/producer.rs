//! The producer behind [`crate::KafkaBus`]: librdkafka's producer, with one thread of ours
//! serving its delivery reports to the futures publishers await.
//!
//! rdkafka's `FutureProducer` does the same from a thread that polls in 100 ms windows, and
//! rdkafka 0.38's `BaseProducer::poll` spins through the last millisecond of every window (it
//! floors the time left to whole milliseconds, so it calls `rd_kafka_queue_poll` with 0 until
//! the window ends): about 1 % of a core per process, idle or busy. Ours polls in
//! [`POLL_WINDOW`]s of a second, so that spin is a tenth of it; a delivery report is still
//! handed over the moment librdkafka queues it (the poll returns on each event).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::Client;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

use crate::LogContext;

/// How long one poll of the delivery thread lasts; the thread notices that its producer was
/// dropped within one window.
pub(crate) const POLL_WINDOW: Duration = Duration::from_secs(1);

/// What the broker said about one message: acknowledged, or why not.
pub(crate) type Delivered = Result<(), KafkaError>;

/// The producer's context: librdkafka's log, and each delivery report sent to its message's
/// waiting future.
pub(crate) struct DeliveryContext {
    log: LogContext,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiting: Self::DeliveryOpaque) {
        // A publisher that stopped waiting (its task was cancelled) is told nothing.
        let _ = waiting.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

/// A producer whose clones share one librdkafka producer and its delivery thread. The thread
/// stops within a [`POLL_WINDOW`] of the last clone's drop, and then drops the librdkafka
/// producer itself (which purges what was never sent), off the async runtime.
#[derive(Clone)]
pub(crate) struct Producer {
    shared: Arc<Shared>,
}

struct Shared {
    producer: Arc<BaseProducer<DeliveryContext>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Producer {
    /// A producer made with `config`, logging as `log` says, and its delivery thread.
    pub(crate) fn new(config: &ClientConfig, log: LogContext) -> Result<Producer, KafkaError> {
        let producer: BaseProducer<DeliveryContext> =
            config.create_with_context(DeliveryContext { log })?;
        let producer = Arc::new(producer);
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::clone(&producer);
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("kafka-deliveries".to_string())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    served.poll(POLL_WINDOW);
                }
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("cannot start the delivery thread: {e}"))
            })?;
        Ok(Producer {
            shared: Arc::new(Shared { producer, stop }),
        })
    }

    /// The librdkafka client, for metadata requests.
    pub(crate) fn client(&self) -> &Client<DeliveryContext> {
        self.shared.producer.client()
    }

    /// Queue `payload` for `topic`/`partition` under `key`; the receiver gets its delivery.
    /// Fails at once when librdkafka refuses it (e.g. its queue is full).
    pub(crate) fn enqueue(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
    ) -> Result<oneshot::Receiver<Delivered>, KafkaError> {
        let (tx, rx) = oneshot::channel();
        let record = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .partition(partition)
            .key(key)
            .payload(payload);
        self.shared
            .producer
            .send(record)
            .map(|()| rx)
            .map_err(|(e, _)| e)
    }
}
