//! Topic and consumer-group naming: the engine names its topics logically
//! (`workflow.steps.action`); a deployment maps them onto its own cluster's names with a prefix
//! (`staging.` + name) or one name per topic, and prefixes its consumer groups the same way, so
//! several deployments (or test runs) can share one Kafka cluster without seeing each other.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{Bus, BusError, Message, Outgoing, Subscription};

/// How logical names become physical ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Naming {
    /// Put before every topic without an explicit name, and before every consumer group.
    pub prefix: String,
    /// Logical topic → physical topic, taking precedence over the prefix.
    pub topics: BTreeMap<String, String>,
}

impl Naming {
    /// The physical name of logical `topic`.
    pub fn topic(&self, topic: &str) -> String {
        match self.topics.get(topic) {
            Some(name) => name.clone(),
            None => format!("{}{topic}", self.prefix),
        }
    }

    /// The physical name of consumer group `group`.
    pub fn group(&self, group: &str) -> String {
        format!("{}{group}", self.prefix)
    }

    /// The logical name of physical `topic` (itself when it is not one of ours).
    pub fn logical(&self, topic: &str) -> String {
        if let Some((logical, _)) = self.topics.iter().find(|(_, p)| p.as_str() == topic) {
            return logical.clone();
        }
        topic
            .strip_prefix(self.prefix.as_str())
            .unwrap_or(topic)
            .to_string()
    }
}

/// A bus that applies a [`Naming`] to another bus: callers use logical names throughout.
pub struct NamedBus {
    inner: Arc<dyn Bus>,
    naming: Arc<Naming>,
}

impl NamedBus {
    pub fn new(inner: Arc<dyn Bus>, naming: Naming) -> NamedBus {
        NamedBus {
            inner,
            naming: Arc::new(naming),
        }
    }

    pub fn naming(&self) -> &Naming {
        &self.naming
    }
}

#[async_trait::async_trait]
impl Bus for NamedBus {
    async fn publish(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<(), BusError> {
        self.inner
            .publish(&self.naming.topic(topic), key, payload)
            .await
    }

    async fn publish_batch(&self, batch: Vec<Outgoing>) -> Result<(), BusError> {
        let batch = batch
            .into_iter()
            .map(|mut m| {
                m.topic = self.naming.topic(&m.topic);
                m
            })
            .collect();
        self.inner.publish_batch(batch).await
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BusError> {
        let inner = self
            .inner
            .subscribe(&self.naming.topic(topic), &self.naming.group(group))
            .await?;
        Ok(Box::new(NamedSubscription {
            inner,
            naming: self.naming.clone(),
        }))
    }
}

/// A subscription whose messages carry logical topic names; commits translate back.
struct NamedSubscription {
    inner: Box<dyn Subscription>,
    naming: Arc<Naming>,
}

#[async_trait::async_trait]
impl Subscription for NamedSubscription {
    async fn next(&mut self) -> Result<Option<Message>, BusError> {
        Ok(self.inner.next().await?.map(|mut m| {
            m.topic = self.naming.logical(&m.topic);
            m
        }))
    }

    async fn commit(&mut self, msg: &Message) -> Result<(), BusError> {
        let mut physical = msg.clone();
        physical.topic = self.naming.topic(&msg.topic);
        self.inner.commit(&physical).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InProcessBus;

    #[test]
    fn names_map_both_ways() {
        let naming = Naming {
            prefix: "t1.".into(),
            topics: BTreeMap::from([("payos.transfers".to_string(), "transfers-v2".to_string())]),
        };
        assert_eq!(
            naming.topic("workflow.steps.wait"),
            "t1.workflow.steps.wait"
        );
        assert_eq!(naming.topic("payos.transfers"), "transfers-v2");
        assert_eq!(naming.group("pool-wait"), "t1.pool-wait");
        assert_eq!(
            naming.logical("t1.workflow.steps.wait"),
            "workflow.steps.wait"
        );
        assert_eq!(naming.logical("transfers-v2"), "payos.transfers");
        assert_eq!(naming.logical("elsewhere"), "elsewhere");
    }

    #[tokio::test]
    async fn callers_see_logical_names_and_the_cluster_physical_ones() -> Result<(), BusError> {
        let raw = Arc::new(InProcessBus::new(2));
        let naming = Naming {
            prefix: "ns.".into(),
            topics: BTreeMap::new(),
        };
        let bus = NamedBus::new(raw.clone(), naming);
        let mut physical = raw.subscribe("ns.orders", "spy").await?;
        let mut logical = bus.subscribe("orders", "workers").await?;
        bus.publish_batch(vec![Outgoing {
            topic: "orders".into(),
            key: "k".into(),
            payload: b"one".to_vec(),
        }])
        .await?;
        let seen = physical.next().await?.ok_or(BusError::Closed)?;
        assert_eq!(seen.topic, "ns.orders");
        let got = logical.next().await?.ok_or(BusError::Closed)?;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("orders", &b"one"[..])
        );
        logical.commit(&got).await?;
        Ok(())
    }
}
