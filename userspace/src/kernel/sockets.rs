//! The kernel datapath's listening sockets: one SO_REUSEPORT socket per worker per UDP and TCP
//! listener, one shared socket per Unix listener (bound by [`crate::net`]).

use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;

use anyhow::Result;

use crate::core::Protocol;
use crate::net::{bind_tcp_group, bind_udp_group, bind_unix, UnixEndpoint};
use crate::spec::{ListenSpec, Transport};

/// The sockets one worker serves.
#[derive(Debug, Default)]
pub struct WorkerSockets {
    pub udp: Vec<(Protocol, UdpSocket)>,
    pub tcp: Vec<(Protocol, TcpListener)>,
    pub unix: Vec<(Protocol, Arc<UnixEndpoint>)>,
}

/// Every listener bound for `n_workers` workers, with the addresses actually bound (port 0 resolved).
#[derive(Debug)]
pub struct BoundListeners {
    pub per_worker: Vec<WorkerSockets>,
    pub bound: Vec<ListenSpec>,
}

/// Binds every listener for `n_workers` workers.
pub fn bind_all(specs: &[ListenSpec], n_workers: usize) -> Result<BoundListeners> {
    let mut per_worker: Vec<WorkerSockets> =
        (0..n_workers).map(|_| WorkerSockets::default()).collect();
    let mut bound = Vec::new();
    for spec in specs {
        let label = spec.to_string();
        let transport = match &spec.transport {
            Transport::Udp(addr) => {
                let (sockets, local) = bind_udp_group(&label, *addr, n_workers)?;
                for (worker, socket) in per_worker.iter_mut().zip(sockets) {
                    worker.udp.push((spec.protocol, socket));
                }
                Transport::Udp(local)
            }
            Transport::Tcp(addr) => {
                let (sockets, local) = bind_tcp_group(&label, *addr, n_workers)?;
                for (worker, socket) in per_worker.iter_mut().zip(sockets) {
                    worker.tcp.push((spec.protocol, socket));
                }
                Transport::Tcp(local)
            }
            Transport::Unix(path) => {
                let endpoint = Arc::new(bind_unix(&label, path)?);
                for worker in per_worker.iter_mut() {
                    worker.unix.push((spec.protocol, endpoint.clone()));
                }
                Transport::Unix(path.clone())
            }
        };
        bound.push(ListenSpec {
            protocol: spec.protocol,
            transport,
        });
    }
    Ok(BoundListeners { per_worker, bound })
}
