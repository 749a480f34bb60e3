//! [`RedisJobs`]: polling jobs, leases, cached quotes and raw responses in Redis (see
//! [`crate::jobs`] for what each is for).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `PREFIX:polljobs` | hash | job id → the job as JSON |
//! | `PREFIX:poll:{PROVIDER:SYMBOL}:lock` | string, TTL | `HOLDER TOKEN` of the lease's holder |
//! | `PREFIX:poll:{PROVIDER:SYMBOL}:fence` | string | the last fencing token drawn (`INCR`) |
//! | `PREFIX:poll:{PROVIDER:SYMBOL}:raw` | stream | raw responses (`body`, `fetched_ns`, `lease`), about [`RAW_KEPT`] |
//! | `PREFIX:poll:{PROVIDER:SYMBOL}:quote` | hash, TTL | the cached quote: `price`, `time_ns`, `fetched_ns`, `raw_id` |
//! | `PREFIX:poll:{PROVIDER:SYMBOL}:state` | hash | the last new price (`price`, `ptime`), its tick (`etime`, `seq`, `raw_id`) and `pending` |
//!
//! A pair's keys share the hash tag `{PROVIDER:SYMBOL}`, so each script below touches one slot (on a
//! cluster too). The lease is checked inside every script that writes for its holder, so a holder whose
//! lease expired cannot write once another took it: that comparison of `HOLDER TOKEN` is the fence.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::conn::Conn;
use crate::StoreError;
use crate::jobs::{
    Commit, JobStore, Lease, Observation, Pair, Pending, PollJob, Quote, RAW_KEPT, pair_tick,
};

const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. t, 'PX', ARGV[2])
return t";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1";

// KEYS: lock, raw, quote, state. ARGV: lease, price, provider time, event time, fetched, body,
// cache ttl ms, raw kept.
const COMMIT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*',
  'body', ARGV[6], 'fetched_ns', ARGV[5], 'lease', ARGV[1])
redis.call('HSET', KEYS[3], 'price', ARGV[2], 'time_ns', ARGV[4], 'fetched_ns', ARGV[5], 'raw_id', id)
redis.call('PEXPIRE', KEYS[3], ARGV[7])
local last = redis.call('HMGET', KEYS[4], 'price', 'ptime')
if last[1] == ARGV[2] and last[2] == ARGV[3] then return {1, id} end
local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
redis.call('HSET', KEYS[4], 'price', ARGV[2], 'ptime', ARGV[3], 'etime', ARGV[4], 'raw_id', id, 'pending', 1)
return {2, id, seq}";

// KEYS: lock, state. ARGV: lease, seq.
const PRODUCED: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'seq') == ARGV[2] then redis.call('HSET', KEYS[2], 'pending', 0) end
return 1";

/// [`JobStore`] in Redis (one server or a cluster), under the store's key prefix.
#[derive(Clone)]
pub struct RedisJobs {
    conn: Conn,
    prefix: String,
}

impl std::fmt::Debug for RedisJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJobs")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn lease_value(lease: &Lease) -> String {
    format!("{} {}", lease.holder, lease.token)
}

fn corrupt(key: &str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        detail: detail.into(),
    }
}

impl RedisJobs {
    pub(super) fn new(conn: Conn, prefix: &str) -> Self {
        RedisJobs {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    fn jobs_key(&self) -> String {
        format!("{}:polljobs", self.prefix)
    }

    fn key(&self, pair: &Pair, what: &str) -> String {
        format!(
            "{}:poll:{{{}:{}}}:{what}",
            self.prefix, pair.provider, pair.symbol
        )
    }

    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &str,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
        self.conn.query(&cmd).await
    }
}

#[async_trait]
impl JobStore for RedisJobs {
    async fn create_job(&self, job: &PollJob) -> Result<(), StoreError> {
        let json = serde_json::to_string(job).map_err(|e| corrupt(&job.id, e.to_string()))?;
        let _: i64 = self
            .conn
            .query(
                redis::cmd("HSET")
                    .arg(self.jobs_key())
                    .arg(&job.id)
                    .arg(json),
            )
            .await?;
        Ok(())
    }

    async fn job(&self, id: &str) -> Result<Option<PollJob>, StoreError> {
        let json: Option<String> = self
            .conn
            .query(redis::cmd("HGET").arg(self.jobs_key()).arg(id))
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt(&self.jobs_key(), e.to_string())))
            .transpose()
    }

    async fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        let n: i64 = self
            .conn
            .query(redis::cmd("HDEL").arg(self.jobs_key()).arg(id))
            .await?;
        Ok(n > 0)
    }

    async fn jobs(&self) -> Result<Vec<PollJob>, StoreError> {
        let all: Vec<String> = self
            .conn
            .query(redis::cmd("HVALS").arg(self.jobs_key()))
            .await?;
        let mut jobs = all
            .iter()
            .map(|j| {
                serde_json::from_str::<PollJob>(j)
                    .map_err(|e| corrupt(&self.jobs_key(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(jobs)
    }

    async fn acquire(
        &self,
        pair: &Pair,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        if holder.is_empty() || holder.contains(' ') {
            return Err(StoreError::Config(format!(
                "lease holder id {holder:?}: must be non-empty, without spaces"
            )));
        }
        self.eval(
            ACQUIRE,
            &[self.key(pair, "lock"), self.key(pair, "fence")],
            &[holder.to_owned(), ms(ttl).to_string()],
        )
        .await
    }

    async fn renew(&self, pair: &Pair, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let ok: i64 = self
            .eval(
                RENEW,
                &[self.key(pair, "lock")],
                &[lease_value(lease), ms(ttl).to_string()],
            )
            .await?;
        Ok(ok == 1)
    }

    async fn release(&self, pair: &Pair, lease: &Lease) -> Result<(), StoreError> {
        let _: i64 = self
            .eval(RELEASE, &[self.key(pair, "lock")], &[lease_value(lease)])
            .await?;
        Ok(())
    }

    async fn holder(&self, pair: &Pair) -> Result<Option<Lease>, StoreError> {
        let key = self.key(pair, "lock");
        let v: Option<String> = self.conn.query(redis::cmd("GET").arg(&key)).await?;
        v.map(|v| {
            let (holder, token) = v
                .rsplit_once(' ')
                .ok_or_else(|| corrupt(&key, format!("lease {v:?}")))?;
            let token = token
                .parse()
                .map_err(|_| corrupt(&key, format!("lease {v:?}")))?;
            Ok(Lease {
                holder: holder.to_owned(),
                token,
            })
        })
        .transpose()
    }

    async fn commit(
        &self,
        pair: &Pair,
        lease: &Lease,
        o: &Observation,
        cache_ttl: Duration,
    ) -> Result<Commit, StoreError> {
        let price = o.price.normalize();
        let reply: Vec<Value> = self
            .eval(
                COMMIT,
                &[
                    self.key(pair, "lock"),
                    self.key(pair, "raw"),
                    self.key(pair, "quote"),
                    self.key(pair, "state"),
                ],
                &[
                    lease_value(lease),
                    price.to_string(),
                    o.provider_time_ns.to_string(),
                    o.event_time_ns.to_string(),
                    o.fetched_ns.to_string(),
                    o.raw.clone(),
                    ms(cache_ttl).to_string(),
                    RAW_KEPT.to_string(),
                ],
            )
            .await?;
        let bad = || corrupt(&self.key(pair, "state"), format!("commit reply {reply:?}"));
        let int = |v: &Value| redis::from_redis_value_ref::<i64>(v).map_err(|_| bad());
        let text = |v: &Value| redis::from_redis_value_ref::<String>(v).map_err(|_| bad());
        match reply.as_slice() {
            [k] if int(k)? == 0 => Ok(Commit::Fenced),
            [k, id] if int(k)? == 1 => Ok(Commit::Unchanged { raw_id: text(id)? }),
            [k, id, seq] if int(k)? == 2 => {
                let seq = u64::try_from(int(seq)?).map_err(|_| bad())?;
                Ok(Commit::New(Pending {
                    tick: pair_tick(pair, price, o.event_time_ns, seq),
                    raw_id: text(id)?,
                }))
            }
            _ => Err(bad()),
        }
    }

    async fn pending(&self, pair: &Pair) -> Result<Option<Pending>, StoreError> {
        let key = self.key(pair, "state");
        let v: Vec<Option<String>> = self
            .conn
            .query(
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&["pending", "price", "etime", "seq", "raw_id"]),
            )
            .await?;
        let [
            Some(pending),
            Some(price),
            Some(etime),
            Some(seq),
            Some(raw_id),
        ] = v.as_slice()
        else {
            return Ok(None);
        };
        if pending != "1" {
            return Ok(None);
        }
        let bad = |what: &str| corrupt(&key, format!("{what} of the pending tick"));
        Ok(Some(Pending {
            tick: pair_tick(
                pair,
                price.parse().map_err(|_| bad("price"))?,
                etime.parse().map_err(|_| bad("event time"))?,
                seq.parse().map_err(|_| bad("seq"))?,
            ),
            raw_id: raw_id.clone(),
        }))
    }

    async fn produced(&self, pair: &Pair, lease: &Lease, seq: u64) -> Result<bool, StoreError> {
        let ok: i64 = self
            .eval(
                PRODUCED,
                &[self.key(pair, "lock"), self.key(pair, "state")],
                &[lease_value(lease), seq.to_string()],
            )
            .await?;
        Ok(ok == 1)
    }

    async fn quote(&self, pair: &Pair) -> Result<Option<Quote>, StoreError> {
        let key = self.key(pair, "quote");
        let v: Vec<Option<String>> = self
            .conn
            .query(
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&["price", "time_ns", "fetched_ns", "raw_id"]),
            )
            .await?;
        let [Some(price), Some(time), Some(fetched), Some(raw_id)] = v.as_slice() else {
            return Ok(None);
        };
        let bad = |what: &str| corrupt(&key, format!("{what} of the cached quote"));
        Ok(Some(Quote {
            provider: pair.provider.clone(),
            symbol: pair.symbol.clone(),
            price: price.parse().map_err(|_| bad("price"))?,
            time_ns: time.parse().map_err(|_| bad("time"))?,
            fetched_ns: fetched.parse().map_err(|_| bad("fetch time"))?,
            raw_id: raw_id.clone(),
        }))
    }

    async fn raw(&self, pair: &Pair, raw_id: &str) -> Result<Option<String>, StoreError> {
        // a stream id is MS-SEQ; anything else names no raw response (and would be a Redis error)
        let is_id = raw_id.split_once('-').is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
        });
        if !is_id {
            return Ok(None);
        }
        let entries: Vec<(String, Vec<(String, String)>)> = self
            .conn
            .query(
                redis::cmd("XRANGE")
                    .arg(self.key(pair, "raw"))
                    .arg(raw_id)
                    .arg(raw_id),
            )
            .await?;
        Ok(entries.into_iter().next().and_then(|(_, fields)| {
            fields
                .into_iter()
                .find(|(k, _)| k == "body")
                .map(|(_, v)| v)
        }))
    }
}
