//! [`Meta`] on a real etcd (the `etcd-client` crate, gRPC): requests go to the endpoints that
//! accept connections; lease keep-alives fail over across every endpoint given.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use tokio::time::Instant;

use crate::meta::{renew_period, Changes, Cmp, Kv, Meta, Op, Txn, TxnResult};
use crate::{ClusterError, Result};

/// A connection to etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    /// Every endpoint given, live or not (keep-alives fail over across them).
    endpoints: std::sync::Arc<Vec<String>>,
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        // etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
}

/// Whether the endpoint `url` (`http://host:port`) accepts TCP connections within `wait`.
async fn accepts(url: &str, wait: Duration) -> bool {
    let hostport = url.trim_start_matches("http://").trim_end_matches('/');
    matches!(
        tokio::time::timeout(wait, tokio::net::TcpStream::connect(hostport)).await,
        Ok(Ok(_))
    )
}

fn kv(k: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: k.key().to_vec(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision(),
        lease: k.lease(),
    }
}

fn compare(c: Cmp) -> Compare {
    match c {
        Cmp::Absent(k) => Compare::create_revision(k, CompareOp::Equal, 0),
        Cmp::Present(k) => Compare::create_revision(k, CompareOp::Greater, 0),
        Cmp::ModRevision(k, rev) => Compare::mod_revision(k, CompareOp::Equal, rev),
        Cmp::Lease(k, lease) => Compare::lease(k, CompareOp::Equal, lease),
    }
}

fn txn_op(o: Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
        }
        Op::Delete(key) => TxnOp::delete(key, None),
        Op::DeletePrefix(key) => TxnOp::delete(key, Some(DeleteOptions::new().with_prefix())),
        Op::Get(key) => TxnOp::get(key, None),
    }
}

impl Etcd {
    /// Connect to etcd at `endpoints` (URLs like `http://127.0.0.1:2379`).
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(ClusterError::Invalid("no etcd endpoint given".into()));
        }
        // Endpoints that do not accept connections (a member that is down) are left out, so
        // that requests are not sent their way; with none up, all are tried.
        let mut up = Vec::new();
        for e in endpoints {
            if accepts(e, Duration::from_secs(1)).await {
                up.push(e.clone());
            }
        }
        let use_eps = if up.is_empty() {
            endpoints.to_vec()
        } else {
            up
        };
        let client = Client::connect(use_eps, Some(connect_options())).await?;
        Ok(Self {
            client,
            endpoints: std::sync::Arc::new(endpoints.to_vec()),
        })
    }

    /// A keep-alive stream for lease `id` on a client of its own, connected to the first
    /// endpoint from `start` on (round robin) that accepts connections: a stream whose member
    /// died moves to a live one at once, rather than waiting for the shared channel to notice.
    async fn keep_alive_stream(
        &self,
        id: i64,
        start: usize,
        wait: Duration,
    ) -> Result<(Client, LeaseKeeper, LeaseKeepAliveStream)> {
        let n = self.endpoints.len();
        let mut last = ClusterError::Invalid("no etcd endpoint accepts connections".into());
        for i in 0..n {
            let ep = &self.endpoints[(start + i) % n];
            if !accepts(ep, wait).await {
                continue;
            }
            let attempt = async {
                let mut client = Client::connect([ep.clone()], Some(connect_options())).await?;
                let (k, s) = client.lease_keep_alive(id).await?;
                Ok::<_, etcd_client::Error>((client, k, s))
            };
            match tokio::time::timeout(wait, attempt).await {
                Ok(Ok(x)) => return Ok(x),
                Ok(Err(e)) => last = e.into(),
                Err(_) => last = ClusterError::Invalid(format!("{ep}: no answer in {wait:?}")),
            }
        }
        Err(last)
    }

    async fn keep_alive_loop(
        &self,
        id: i64,
        ttl: i64,
        mut renewed: Box<dyn FnMut(Instant) + Send + '_>,
    ) -> ClusterError {
        let period = renew_period(ttl);
        // Answers normally come in milliseconds; a member that takes longer is given up on
        // early enough to try the others before the lease is in danger.
        let wait = (period / 2).max(Duration::from_millis(300));
        let limit = Duration::from_secs(ttl.max(1) as u64);
        let mut last_ok = Instant::now();
        let mut last_err: Option<ClusterError> = None;
        let mut chan = None;
        let mut next = 0usize;
        loop {
            if last_ok.elapsed() > limit {
                return last_err.unwrap_or_else(|| {
                    ClusterError::Invalid(format!("lease {id:x} not renewed in {ttl} s"))
                });
            }
            if chan.is_none() {
                match self.keep_alive_stream(id, next, wait).await {
                    Ok(k) => chan = Some(k),
                    Err(e) => last_err = Some(e),
                }
                // The next reopening starts at the next endpoint.
                next = next.wrapping_add(1);
            }
            let mut renewed_now = false;
            if let Some((_, keeper, stream)) = chan.as_mut() {
                let sent = Instant::now();
                let answer = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(wait, answer).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        last_ok = sent;
                        renewed(sent);
                        renewed_now = true;
                    }
                    Ok(Ok(Some(_))) => {
                        return ClusterError::Invalid(format!("lease {id:x} expired"));
                    }
                    Ok(Ok(None)) => {
                        last_err = Some(ClusterError::Invalid("keep-alive stream ended".into()));
                        chan = None;
                    }
                    Ok(Err(e)) => {
                        last_err = Some(e.into());
                        chan = None;
                    }
                    Err(_) => {
                        last_err = Some(ClusterError::Invalid(format!(
                            "keep-alive not answered in {wait:?}"
                        )));
                        chan = None;
                    }
                }
            }
            // Renewed: wait a fifth of the TTL. Not: try again (another member) shortly.
            let pause = if renewed_now {
                period
            } else {
                Duration::from_millis(100)
            };
            tokio::time::sleep(pause).await;
        }
    }
}

struct EtcdChanges {
    stream: WatchStream,
}

impl Changes for EtcdChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<()>> {
        async move {
            match self.stream.message().await? {
                Some(_) => Ok(()),
                None => Err(ClusterError::Invalid("the watch ended".into())),
            }
        }
        .boxed()
    }
}

impl Meta for Etcd {
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Kv>>> {
        async move {
            let r = self.client.clone().get(key, None).await?;
            Ok(r.kvs().first().map(kv))
        }
        .boxed()
    }

    fn get_prefix(&self, prefix: String) -> BoxFuture<'_, Result<Vec<Kv>>> {
        async move {
            let r = self
                .client
                .clone()
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await?;
            Ok(r.kvs().iter().map(kv).collect())
        }
        .boxed()
    }

    fn put(&self, key: String, value: Vec<u8>, lease: Option<i64>) -> BoxFuture<'_, Result<()>> {
        async move {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            self.client.clone().put(key, value, opts).await?;
            Ok(())
        }
        .boxed()
    }

    fn delete(&self, key: String, prefix: bool) -> BoxFuture<'_, Result<()>> {
        async move {
            let opts = prefix.then(|| DeleteOptions::new().with_prefix());
            self.client.clone().delete(key, opts).await?;
            Ok(())
        }
        .boxed()
    }

    fn txn(&self, t: Txn) -> BoxFuture<'_, Result<TxnResult>> {
        async move {
            let txn = etcd_client::Txn::new()
                .when(t.when.into_iter().map(compare).collect::<Vec<_>>())
                .and_then(t.then.into_iter().map(txn_op).collect::<Vec<_>>())
                .or_else(t.otherwise.into_iter().map(txn_op).collect::<Vec<_>>());
            let resp = self.client.clone().txn(txn).await?;
            let got = resp
                .op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(g) => Some(g.kvs().first().map(kv)),
                    _ => None,
                })
                .collect();
            Ok(TxnResult {
                succeeded: resp.succeeded(),
                got,
            })
        }
        .boxed()
    }

    fn grant(&self, ttl: i64) -> BoxFuture<'_, Result<i64>> {
        async move { Ok(self.client.clone().lease_grant(ttl, None).await?.id()) }.boxed()
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<()>> {
        async move {
            self.client.clone().lease_revoke(lease).await?;
            Ok(())
        }
        .boxed()
    }

    fn keep_alive<'a>(
        &'a self,
        lease: i64,
        ttl: i64,
        renewed: Box<dyn FnMut(Instant) + Send + 'a>,
    ) -> BoxFuture<'a, ClusterError> {
        self.keep_alive_loop(lease, ttl, renewed).boxed()
    }

    fn campaign(&self, election: String, value: String, lease: i64) -> BoxFuture<'_, Result<()>> {
        async move {
            self.client.clone().campaign(election, value, lease).await?;
            Ok(())
        }
        .boxed()
    }

    fn leader(&self, election: String) -> BoxFuture<'_, Result<Option<String>>> {
        async move {
            match self.client.clone().leader(election).await {
                Ok(r) => Ok(r
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
                // No leader: etcd answers "election: no leader".
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => {
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        }
        .boxed()
    }

    fn watch(&self, prefix: String) -> BoxFuture<'_, Result<Box<dyn Changes>>> {
        async move {
            let stream = self
                .client
                .clone()
                .watch(prefix, Some(WatchOptions::new().with_prefix()))
                .await?;
            Ok(Box::new(EtcdChanges { stream }) as Box<dyn Changes>)
        }
        .boxed()
    }
}
