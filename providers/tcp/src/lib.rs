//! TCP provider (placeholder while the provider is written; it reports itself
//! unavailable).
use std::sync::Arc;

use fabric_core::provider::FabricOps;
use fabric_core::{Error, Info, Provider, Result};

struct TcpProvider;

impl Provider for TcpProvider {
    fn name(&self) -> &'static str {
        "tcp"
    }
    fn available(&self) -> std::result::Result<(), String> {
        Err("under construction".into())
    }
    fn offers(&self) -> Vec<Info> {
        Vec::new()
    }
    fn open_fabric(&self, _info: &Info) -> Result<Arc<dyn FabricOps>> {
        Err(Error::unsupported("under construction"))
    }
}

/// The tcp provider.
pub fn provider() -> Arc<dyn Provider> {
    Arc::new(TcpProvider)
}
