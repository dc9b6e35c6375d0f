//! What this instance does with a `jobplane.v1` call depends on its role: the leader serves it
//! from its engine; another instance forwards it, unchanged and streaming both ways, to the
//! leader; an instance without a database (or before it knows a leader) answers `UNAVAILABLE`.
//!
//! Each of the three services is a [`Switch`] that looks up the current [`Role`] per call.
//! Health, reflection and metrics are always served locally.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::Frame;
use jobplane_proto::pb;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthReporter;
use tower::{Service, ServiceExt};

use super::{admin, job, worker, MAX_MESSAGE};
use crate::engine::Engine;

/// The health-check name that is SERVING only on the instance that leads (NOT_SERVING on the
/// others): tells operators, and tests, which instance leads, without polling.
pub const LEADER_HEALTH: &str = "jobplane.leader";

/// Marks a call one instance forwarded to another: the receiver must serve it itself, never
/// forward it again (a stale leader record cannot make calls go round in circles).
const FORWARDED: &str = "jobplane-forwarded";

/// This instance's services on its own engine (while it leads).
#[derive(Clone)]
struct Local {
    jobs: pb::job_service_server::JobServiceServer<job::Jobs>,
    workers: pb::worker_service_server::WorkerServiceServer<worker::Workers>,
    admin: pb::admin_service_server::AdminServiceServer<admin::Admin>,
}

impl Local {
    fn new(engine: Arc<Engine>) -> Local {
        Local {
            jobs: pb::job_service_server::JobServiceServer::new(job::Jobs::new(engine.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            workers: pb::worker_service_server::WorkerServiceServer::new(worker::Workers::new(
                engine.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
            admin: pb::admin_service_server::AdminServiceServer::new(admin::Admin::new(engine)),
        }
    }
}

/// The leader this instance forwards to.
struct Upstream {
    addr: String,
    channel: Channel,
    /// Cancelled when this instance stops forwarding to it: streams in flight end then.
    gone: CancellationToken,
    /// False after a forwarded call could not reach it, until one gets through again: health
    /// reports NOT_SERVING meanwhile.
    reachable: AtomicBool,
}

/// First and longest pause between probes of a leader found unreachable.
const PROBE_MIN: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(5);

enum Role {
    Down(String),
    Leader(Local),
    Follower(Upstream),
}

/// The current role, shared by the services and changed by the instance's election loop.
pub struct Roles {
    current: RwLock<Arc<Role>>,
    health: HealthReporter,
    /// Woken when a forwarded call could not reach the leader: the leader record is re-read.
    upstream_failed: tokio::sync::Notify,
    /// True once the instance first led, followed or failed: calls are accepted from then on.
    settled: tokio::sync::watch::Sender<bool>,
}

impl Roles {
    /// Starts down ("starting"); health is set by the first role.
    pub fn new() -> Arc<Roles> {
        Arc::new(Roles {
            current: RwLock::new(Arc::new(Role::Down("starting".to_owned()))),
            health: HealthReporter::new(),
            upstream_failed: tokio::sync::Notify::new(),
            settled: tokio::sync::watch::Sender::new(false),
        })
    }

    fn current(&self) -> Arc<Role> {
        self.current.read().expect("roles lock poisoned").clone()
    }

    fn replace(&self, role: Role) {
        let old = std::mem::replace(
            &mut *self.current.write().expect("roles lock poisoned"),
            Arc::new(role),
        );
        if let Role::Follower(up) = &*old {
            up.gone.cancel();
        }
    }

    /// The health service, reporting what the roles set.
    pub(super) fn health_service(&self) -> tonic_health::server::HealthService {
        tonic_health::server::HealthService::from_health_reporter(self.health.clone())
    }

    async fn set_health(&self, serving: bool) {
        let h = &self.health;
        let leads = serving && self.leads();
        h.set_service_status(
            LEADER_HEALTH,
            if leads {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            },
        )
        .await;
        macro_rules! set {
            ($svc:ty) => {
                if serving {
                    h.set_serving::<$svc>().await
                } else {
                    h.set_not_serving::<$svc>().await
                }
            };
        }
        set!(pb::job_service_server::JobServiceServer<job::Jobs>);
        set!(pb::worker_service_server::WorkerServiceServer<worker::Workers>);
        set!(pb::admin_service_server::AdminServiceServer<admin::Admin>);
    }

    /// Serves calls from `engine`.
    pub async fn lead(&self, engine: Arc<Engine>) {
        self.replace(Role::Leader(Local::new(engine)));
        self.set_health(true).await;
        self.settled.send_replace(true);
    }

    /// Resolves once the instance has first led, followed or failed (not while it is still
    /// starting or a leader is being elected), so the first calls are not refused for nothing.
    pub fn settled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.settled.subscribe();
        async move {
            while !*rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Forwards calls to the leader at `addr` (`http://HOST:PORT`); false if it already
    /// forwarded there (the connection is kept).
    pub async fn follow(&self, addr: &str) -> Result<bool, String> {
        if let Role::Follower(up) = &*self.current() {
            if up.addr == addr {
                return Ok(false);
            }
        }
        let channel = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| format!("leader address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        self.replace(Role::Follower(Upstream {
            addr: addr.to_owned(),
            channel,
            gone: CancellationToken::new(),
            reachable: AtomicBool::new(true),
        }));
        self.set_health(true).await;
        self.settled.send_replace(true);
        Ok(true)
    }

    /// Resolves when a forwarded call could not reach the leader.
    pub async fn upstream_failed(&self) {
        self.upstream_failed.notified().await
    }

    /// A forwarded call reached the leader of `role` (`true`) or could not (`false`). On a
    /// change, health follows (if `role` is still current), and an unreachable leader is probed
    /// (its health service, with back-off) until it answers or the role changes, so the
    /// instance serves again without waiting for a caller to try.
    fn upstream_reached(self: &Arc<Self>, role: &Arc<Role>, reached: bool) {
        let Role::Follower(up) = &**role else {
            return;
        };
        if up.reachable.swap(reached, Ordering::SeqCst) == reached {
            return;
        }
        let (roles, role) = (self.clone(), role.clone());
        tokio::spawn(async move {
            let Role::Follower(up) = &*role else {
                return;
            };
            if !Arc::ptr_eq(&roles.current(), &role) {
                return;
            }
            if reached {
                tracing::info!(leader = %up.addr, "the leader is reachable again");
                roles.set_health(true).await;
                return;
            }
            tracing::warn!(leader = %up.addr, "the leader is unreachable; NOT_SERVING until it answers");
            roles.set_health(false).await;
            let mut pause = PROBE_MIN;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = up.gone.cancelled() => return,
                }
                if up.reachable.load(Ordering::SeqCst) {
                    return;
                }
                let probe = tokio::time::timeout(
                    PROBE_MAX,
                    HealthClient::new(up.channel.clone()).check(HealthCheckRequest {
                        service: String::new(),
                    }),
                )
                .await;
                if matches!(probe, Ok(Ok(_))) {
                    roles.upstream_reached(&role, true);
                    return;
                }
                pause = (pause * 2).min(PROBE_MAX);
            }
        });
    }

    /// Answers `UNAVAILABLE` (`why`) and reports NOT_SERVING.
    pub async fn down(&self, why: &str) {
        self.replace(Role::Down(why.to_owned()));
        self.set_health(false).await;
        self.settled.send_replace(true);
    }

    /// [`Self::down`] for a moment (a leader is being elected): a starting instance keeps
    /// waiting to accept calls.
    pub async fn electing(&self, why: &str) {
        self.replace(Role::Down(why.to_owned()));
        self.set_health(false).await;
    }

    /// Whether this instance leads.
    pub fn leads(&self) -> bool {
        matches!(&*self.current(), Role::Leader(_))
    }
}

/// One `jobplane.v1` service, served by the current role.
pub struct Switch<S> {
    roles: Arc<Roles>,
    pick: fn(&Local) -> S,
}

impl<S> Clone for Switch<S> {
    fn clone(&self) -> Self {
        Switch {
            roles: self.roles.clone(),
            pick: self.pick,
        }
    }
}

impl<S: NamedService> NamedService for Switch<S> {
    const NAME: &'static str = S::NAME;
}

/// The three services, switched by `roles`.
#[allow(clippy::type_complexity)]
pub fn services(
    roles: &Arc<Roles>,
) -> (
    Switch<pb::job_service_server::JobServiceServer<job::Jobs>>,
    Switch<pb::worker_service_server::WorkerServiceServer<worker::Workers>>,
    Switch<pb::admin_service_server::AdminServiceServer<admin::Admin>>,
) {
    (
        Switch {
            roles: roles.clone(),
            pick: |l| l.jobs.clone(),
        },
        Switch {
            roles: roles.clone(),
            pick: |l| l.workers.clone(),
        },
        Switch {
            roles: roles.clone(),
            pick: |l| l.admin.clone(),
        },
    )
}

fn unavailable(why: String) -> http::Response<Body> {
    Status::unavailable(why).into_http()
}

impl<S> Service<http::Request<Body>> for Switch<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let role = self.roles.current();
        match &*role {
            Role::Leader(local) => {
                let svc = (self.pick)(local);
                Box::pin(svc.oneshot(req))
            }
            Role::Down(why) => {
                let why = why.clone();
                Box::pin(async move { Ok(unavailable(why)) })
            }
            Role::Follower(_) if req.headers().contains_key(FORWARDED) => Box::pin(async move {
                Ok(unavailable(
                    "this instance does not lead (a stale leader record); try again".into(),
                ))
            }),
            Role::Follower(up) => {
                let channel = up.channel.clone();
                let addr = up.addr.clone();
                let gone = up.gone.clone();
                let roles = self.roles.clone();
                let role = role.clone();
                req.headers_mut()
                    .insert(FORWARDED, http::HeaderValue::from_static("1"));
                Box::pin(async move {
                    // (Inside the call's server span, which instruments this future.)
                    super::trace::forward_context(req.headers_mut());
                    let call = channel.oneshot(req);
                    let resp = tokio::select! {
                        r = call => r,
                        _ = gone.cancelled() => {
                            return Ok(unavailable("the leader changed; try again".into()));
                        }
                    };
                    Ok(match resp {
                        Ok(resp) => {
                            roles.upstream_reached(&role, true);
                            resp.map(|body| {
                                Body::new(Cut {
                                    inner: body,
                                    gone: Box::pin(gone.cancelled_owned()),
                                    done: false,
                                })
                            })
                        }
                        Err(e) => {
                            roles.upstream_failed.notify_one();
                            roles.upstream_reached(&role, false);
                            unavailable(format!("the leader at {addr} is unreachable: {e}"))
                        }
                    })
                })
            }
        }
    }
}

/// A forwarded response body that ends with `UNAVAILABLE` when this instance stops forwarding
/// to that leader (it lost it, or is shutting down), so no stream outlives the forwarding.
struct Cut {
    inner: Body,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl http_body::Body for Cut {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.gone.as_mut().poll(cx).is_ready() {
            self.done = true;
            let status = Status::unavailable("this instance stopped forwarding to the leader");
            let mut trailers = http::HeaderMap::new();
            return match status.add_header(&mut trailers) {
                Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Err(_) => Poll::Ready(None),
            };
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            // The leader went away mid-stream (its connection broke): that is for the caller
            // to retry, not an internal error.
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                let status = Status::unavailable(format!(
                    "the connection to the leader broke: {}",
                    e.message()
                ));
                let mut trailers = http::HeaderMap::new();
                match status.add_header(&mut trailers) {
                    Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Err(_) => Poll::Ready(Some(Err(status))),
                }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health;

    use super::*;

    /// A follower whose leader cannot be reached reports NOT_SERVING, probes it, and reports
    /// SERVING again once it answers.
    #[tokio::test]
    async fn an_unreachable_leader_makes_a_follower_not_serving_until_it_answers() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let roles = Roles::new();
        let health = roles.health_service();
        assert!(roles
            .follow(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap());
        let mut statuses = health
            .watch(tonic::Request::new(HealthCheckRequest {
                service: "jobplane.v1.JobService".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let mut next_status = async || {
            tokio::time::timeout(Duration::from_secs(30), statuses.next())
                .await
                .expect("a health change")
                .expect("the watch is open")
                .unwrap()
                .status()
        };
        assert_eq!(next_status().await, ServingStatus::Serving);

        let (mut jobs, _, _) = services(&roles);
        let req = http::Request::builder()
            .uri("/jobplane.v1.JobService/GetJob")
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap();
        let resp = jobs.call(req).await.unwrap();
        let status = Status::from_header_map(resp.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(next_status().await, ServingStatus::NotServing);

        // The leader comes up at that address: the probe finds it.
        let (_, leader_health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(leader_health)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        assert_eq!(next_status().await, ServingStatus::Serving);
        server.abort();
    }
}
