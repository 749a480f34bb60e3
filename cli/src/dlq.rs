//! `tickctl dlq`: look at the dead-letter topic and, after a fix, send its messages back.
//!
//! * `list` reads the whole dead-letter topic (without joining a group or committing anything) and shows
//!   each message's reason, error and origin.
//! * `replay` re-produces dead letters (same key and payload) to their source topic, or `--to`, after
//!   the cause is fixed (say, a raised `--max-payload-bytes`). A consumer group (`--group`) remembers
//!   how far it got, so running it again replays only new dead letters; messages filtered out by
//!   `--reason` are passed over for that group too. Use a new group to replay again from the start.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::out::{outln, sayln};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tickfleet_worker::KafkaOptions;
use tickfleet_worker::dlq::headers;

/// Options of `tickctl dlq`.
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters with their reasons.
    List(ListArgs),
    /// Send dead letters back to their source topic (after fixing what rejected them).
    Replay(ReplayArgs),
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    kafka: KafkaOptions,
    /// Dead-letter topic.
    #[arg(long, default_value = "ticks.dlq")]
    topic: String,
    /// Print JSON, one array.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    #[command(flatten)]
    kafka: KafkaOptions,
    /// Dead-letter topic.
    #[arg(long, default_value = "ticks.dlq")]
    topic: String,
    /// Send to this topic instead of each message's source topic.
    #[arg(long)]
    to: Option<String>,
    /// Only replay dead letters with this reason (e.g. oversized).
    #[arg(long)]
    reason: Option<String>,
    /// Consumer group that remembers what was replayed.
    #[arg(long, default_value = "tickctl-dlq-replay")]
    group: String,
}

/// One dead letter, as `list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Partition in the dead-letter topic.
    pub partition: i32,
    /// Offset in the dead-letter topic.
    pub offset: i64,
    /// Message key.
    pub key: String,
    /// Short reason code.
    pub reason: String,
    /// Full error.
    pub error: String,
    /// Where it came from: topic, partition, offset.
    pub source: String,
    /// Payload size in bytes.
    pub bytes: usize,
    /// When the worker cut the payload to fit the producer's limit: the original size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_from: Option<usize>,
}

fn header(m: &BorrowedMessage<'_>, name: &str) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|h| h.key == name))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Reads every message of `topic` from `start(partition, low)` to the high watermark, calling `each`.
fn read_all(
    consumer: &BaseConsumer,
    topic: &str,
    start: impl Fn(i32, i64) -> i64,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let from = start(p, low).max(low);
        if from < high {
            tpl.add_partition_offset(topic, p, Offset::Offset(from))?;
            remaining.insert(p, high);
        }
    }
    if remaining.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "timed out reading {topic}; partitions left: {:?}",
                remaining.keys()
            );
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let (p, o) = (m.partition(), m.offset());
                if remaining.get(&p).is_some_and(|high| o < *high) {
                    each(&m)?;
                }
                if remaining.get(&p).is_some_and(|high| o + 1 >= *high) {
                    remaining.remove(&p);
                }
            }
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok(())
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let consumer: BaseConsumer = args
        .kafka
        .client_config(&[
            ("group.id", "tickctl-dlq-list"),
            ("enable.auto.commit", "false"),
        ])
        .create()?;
    let mut letters = Vec::new();
    read_all(
        &consumer,
        &args.topic,
        |_, low| low,
        |m| {
            letters.push(DeadLetter {
                partition: m.partition(),
                offset: m.offset(),
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                reason: header(m, headers::REASON),
                error: header(m, headers::ERROR),
                source: format!(
                    "{}/{}@{}",
                    header(m, headers::SOURCE_TOPIC),
                    header(m, headers::SOURCE_PARTITION),
                    header(m, headers::SOURCE_OFFSET)
                ),
                bytes: m.payload().map_or(0, <[u8]>::len),
                truncated_from: header(m, headers::TRUNCATED).parse().ok(),
            });
            Ok(())
        },
    )?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&letters)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    outln!(
        "{:<10} {:<18} {:<12} {:<24} ERROR",
        "AT",
        "REASON",
        "KEY",
        "SOURCE"
    )?;
    for l in &letters {
        *by_reason.entry(&l.reason).or_default() += 1;
        let mut error = l.error.clone();
        error.truncate(100);
        outln!(
            "{:<10} {:<18} {:<12} {:<24} {}",
            format!("{}@{}", l.partition, l.offset),
            l.reason,
            l.key,
            l.source,
            error
        )?;
    }
    outln!(
        "{} dead letters in {}: {by_reason:?}",
        letters.len(),
        args.topic
    )?;
    Ok(ExitCode::SUCCESS)
}

async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let consumer: BaseConsumer = args
        .kafka
        .client_config(&[("group.id", &args.group), ("enable.auto.commit", "false")])
        .create()?;
    let producer: FutureProducer = args
        .kafka
        .client_config(&[
            ("enable.idempotence", "true"),
            ("partitioner", "murmur2_random"),
        ])
        .create()?;
    // Where this group got to last time.
    let metadata = consumer.fetch_metadata(Some(&args.topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == args.topic) {
        for p in t.partitions() {
            tpl.add_partition(&args.topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    let start_of = |p: i32| match committed.find_partition(&args.topic, p).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o,
        _ => 0,
    };
    let mut pending = Vec::new();
    let (mut replayed, mut skipped) = (0u64, 0u64);
    let mut next_offsets: BTreeMap<i32, i64> = BTreeMap::new();
    read_all(
        &consumer,
        &args.topic,
        |p, _| start_of(p),
        |m| {
            next_offsets.insert(m.partition(), m.offset() + 1);
            let reason = header(m, headers::REASON);
            if args.reason.as_ref().is_some_and(|r| *r != reason) {
                skipped += 1;
                return Ok(());
            }
            if !header(m, headers::TRUNCATED).is_empty() {
                // Only a prefix of the message was kept: replaying it would send something else.
                tracing::warn!(
                    partition = m.partition(),
                    offset = m.offset(),
                    "dead letter was truncated to fit the producer; not replayed (its source offset is in the headers)"
                );
                skipped += 1;
                return Ok(());
            }
            let to = args
                .to
                .clone()
                .unwrap_or_else(|| header(m, headers::SOURCE_TOPIC));
            if to.is_empty() {
                bail!(
                    "dead letter {}@{} has no source topic header; use --to",
                    m.partition(),
                    m.offset()
                );
            }
            pending.push((
                to,
                m.key().map(<[u8]>::to_vec),
                m.payload().unwrap_or_default().to_vec(),
                format!("{}/{}@{}", args.topic, m.partition(), m.offset()),
            ));
            Ok(())
        },
    )?;
    for (to, key, payload, from) in &pending {
        let headers = OwnedHeaders::new().insert(Header {
            key: "tickfleet-replayed-from",
            value: Some(from),
        });
        let mut record = FutureRecord::to(to).payload(payload).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("replaying {from} to {to}: {e}"))?;
        replayed += 1;
    }
    // Only after every replayed message is acknowledged: remember how far this group got.
    let mut done = TopicPartitionList::new();
    for (p, next) in &next_offsets {
        done.add_partition_offset(&args.topic, *p, Offset::Offset(*next))?;
    }
    if done.count() > 0 {
        consumer
            .commit(&done, CommitMode::Sync)
            .context("committing replay progress")?;
    }
    sayln!(
        "replayed {replayed} dead letters, skipped {skipped} (group {})",
        args.group
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DlqCommand::List(a) => tokio::task::spawn_blocking(move || list(a)).await?,
        DlqCommand::Replay(a) => replay(a).await,
    }
}
