//! Generated code of the upstream protocols ambridge speaks (`proto/`).

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
        pub mod zds {
            tonic::include_proto!("istio.workload.zds");
        }
    }
}
