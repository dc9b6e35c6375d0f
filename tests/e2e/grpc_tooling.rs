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
    for service in ["", "jobplane.v1.JobService", "jobplane.v1.WorkerService", "jobplane.v1.AdminService"] {
        let r = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_v1_lists_and_describes_the_services() {
    let server = TestServer::start().await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(&server.addr).await);
    let requests = tokio_stream::iter(vec![
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "jobplane.v1.JobService".into(),
            )),
        },
    ]);
    let mut responses = client.server_reflection_info(requests).await.unwrap().into_inner();
    let first = responses.next().await.unwrap().unwrap();
    let services: Vec<String> = match first.message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected {other:?}"),
    };
    for s in ["jobplane.v1.JobService", "jobplane.v1.WorkerService", "jobplane.v1.AdminService", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|x| x == s), "{s} missing from {services:?}");
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
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    }]);
    let mut responses = client.server_reflection_info(requests).await.unwrap().into_inner();
    let first = responses.next().await.unwrap().unwrap();
    match first.message_response.unwrap() {
        v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            assert!(l.service.iter().any(|s| s.name == "jobplane.v1.JobService"));
        }
        other => panic!("unexpected {other:?}"),
    }
}
