//! The fake istiod's side of delta ADS: only the service, over the message
//! types the daemon's own build generated (`ambridge::pb`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(
            ".envoy.service.discovery.v3",
            "::ambridge::pb::envoy::service::discovery::v3",
        )
        .extern_path(
            ".envoy.config.core.v3",
            "::ambridge::pb::envoy::config::core::v3",
        )
        .extern_path(".google.rpc", "::ambridge::pb::google::rpc")
        .compile_protos(
            &["../proto/envoy/service/discovery/v3/ads.proto"],
            &["../proto"],
        )?;
    Ok(())
}
