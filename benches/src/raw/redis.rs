//! Raw `redis`: pipelined XADD, XREADGROUP + one XACK per read.

use anyhow::{Result, bail};
use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use crate::way::{Way, Workload, unique};

/// One raw Redis Streams run.
pub struct RawRedis {
    url: String,
    stream: String,
    group: String,
    publisher: Option<MultiplexedConnection>,
    reader: Option<MultiplexedConnection>,
}

impl RawRedis {
    /// A run against `url` (`redis://host:port`).
    pub fn new(url: &str) -> Self {
        RawRedis {
            url: url.to_owned(),
            stream: unique("raw"),
            group: unique("g"),
            publisher: None,
            reader: None,
        }
    }
}

#[async_trait]
impl Way for RawRedis {
    async fn prepare(&mut self, _work: &Workload) -> Result<()> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await?;
        self.publisher = Some(conn);
        // The reader blocks in XREADGROUP: a connection of its own, as polybus has.
        self.reader = Some(client.get_multiplexed_async_connection().await?);
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some(conn) = self.publisher.as_mut() else { bail!("not prepared") };
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD").arg(&self.stream).arg("*").arg("payload").arg(&work.payload[..]);
        }
        pipe.query_async::<redis::Value>(conn).await?;
        Ok(())
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some(conn) = self.reader.as_mut() else { bail!("not prepared") };
        let mut received = 0;
        while received < work.messages {
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg("raw")
                .arg("COUNT")
                .arg(work.prefetch)
                .arg("BLOCK")
                .arg(2000)
                .arg("STREAMS")
                .arg(&self.stream)
                .arg(">")
                .query_async(conn)
                .await?;
            let ids: Vec<String> =
                reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).map(|e| e.id).collect();
            if ids.is_empty() {
                continue;
            }
            received += ids.len();
            redis::cmd("XACK").arg(&self.stream).arg(&self.group).arg(&ids).query_async::<()>(conn).await?;
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        if let Some(conn) = self.publisher.as_mut() {
            redis::cmd("DEL").arg(&self.stream).query_async::<()>(conn).await?;
        }
        Ok(())
    }
}
