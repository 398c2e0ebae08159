//! The CLI's side of the local API.

use std::path::Path;

use anyhow::Context as _;

use super::pb;

/// Where `ambridge run` serves the API unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ambridge/api.sock";

/// A client of the API at `socket`.
pub async fn connect(
    socket: &Path,
) -> anyhow::Result<pb::node_client::NodeClient<tonic::transport::Channel>> {
    let at = socket.display().to_string();
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://ambridge.local")?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| {
            format!("connecting to the ambridge API at {at} (is `ambridge run` running, and are you root?)")
        })?;
    Ok(pb::node_client::NodeClient::new(channel))
}
