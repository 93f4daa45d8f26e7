//! moat-bench-intercept: what interception costs, in one run. The same HTTPS client sends the
//! same requests to the same loopback server twice: straight (what a passthrough flow is: the
//! guest's TLS ends at the server) and through `moat_net::intercept` (TLS ended and opened
//! again, hyper both ways, a header injected). Prints JSON: the median latency of small
//! requests on one connection and the throughput of a 64 MiB upload, both ways. In-process,
//! no VM: the guest's network path, the same both ways, is left out.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_net::intercept::{self, CaSpec, Context, Interceptor};
use moat_net::{EgressSpec, Policy, Secret};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const SMALL: usize = 300;
const UPLOAD: usize = 64 << 20;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let upstream_ca = CaSpec::generate("bench-upstream")?;
    let group_ca = CaSpec::generate("bench")?;
    let server = Interceptor::new(&upstream_ca, None)?
        .server_config("api.test")
        .map_err(anyhow::Error::msg)?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let Ok(tls) = tokio_rustls::TlsAcceptor::from(server).accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let n = req.into_body().collect().await.map(|b| b.to_bytes().len());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "{}",
                        n.unwrap_or(0)
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let icpt = Arc::new(Interceptor::new(&group_ca, Some(&upstream_ca.cert_pem))?);
    let spec: EgressSpec =
        serde_json::from_value(serde_json::json!({"rules": [{"host": "api.test",
        "ports": [443], "transform": {"headers": {"Authorization": "Bearer ${secret:k}"}}}]}))?;
    let policy = Arc::new(Policy::new(spec)?.with_values(
        [("k".to_string(), Secret::new("sk-bench".into()))].into(),
        None,
    ));

    // Straight: the client trusts the upstream's CA and talks to it directly.
    let direct = client(TcpStream::connect(addr).await?, &upstream_ca.cert_pem).await?;
    let (direct_lat, direct_tput) = measure(direct)
        .await
        .map_err(|e| e.context("passthrough"))?;
    // Intercepted: the client trusts the group CA; the interceptor sits between.
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (audit, mut events) = moat_net::audit::Audit::channel(1024);
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let cx = Context {
        name: "api.test".into(),
        port: 443,
        policy: Arc::new(move || policy.clone()),
        audit,
    };
    tokio::spawn(intercept::serve(
        icpt,
        theirs,
        TcpStream::connect(addr).await?,
        true,
        cx,
    ));
    let through = client(ours, &group_ca.cert_pem).await?;
    let (icpt_lat, icpt_tput) = measure(through)
        .await
        .map_err(|e| e.context("intercepted"))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "bench": "intercept",
            "requests": SMALL,
            "upload_bytes": UPLOAD,
            "passthrough": {"median_latency_us": direct_lat.as_micros() as u64,
                "upload_mib_per_s": direct_tput},
            "intercepted": {"median_latency_us": icpt_lat.as_micros() as u64,
                "upload_mib_per_s": icpt_tput},
            "added_latency_us": icpt_lat.as_micros() as i64 - direct_lat.as_micros() as i64,
            "throughput_ratio": icpt_tput / direct_tput,
        }))?
    );
    Ok(())
}

async fn client<S>(io: S, ca_pem: &str) -> anyhow::Result<Sender>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("api.test")?, io)
        .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// The median latency of `SMALL` GETs and the MiB/s of one `UPLOAD`-byte POST.
async fn measure(mut send: Sender) -> anyhow::Result<(Duration, f64)> {
    let mut lat = Vec::with_capacity(SMALL);
    for _ in 0..SMALL {
        let req = Request::get("/v1/x")
            .header("host", "api.test")
            .body(Full::new(Bytes::new()))?;
        send.ready().await?;
        let t = Instant::now();
        let resp = send.send_request(req).await?;
        resp.into_body().collect().await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let body = Bytes::from(vec![1u8; UPLOAD]);
    let req = Request::post("/v1/upload")
        .header("host", "api.test")
        .body(Full::new(body))?;
    send.ready().await?;
    let t = Instant::now();
    let resp = send.send_request(req).await?;
    let got = resp.into_body().collect().await?.to_bytes();
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        got == UPLOAD.to_string().as_bytes(),
        "the upload arrived whole"
    );
    Ok((lat[SMALL / 2], UPLOAD as f64 / (1 << 20) as f64 / secs))
}
