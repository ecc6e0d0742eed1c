//! `cargo xtask splice-proxy`: the bench's baseline proxy. It understands nothing of the
//! Postgres protocol: accept, connect upstream, `copy_bidirectional` until either side closes.
//! The bench runs it as its own process (like pgward and PgBouncer) on a tokio multi-thread
//! runtime with the default worker count (one per core, as pgward's default).

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct SpliceArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long)]
    pub listen: String,
    /// Address to relay every connection to, HOST:PORT.
    #[arg(long)]
    pub upstream: String,
}

pub fn run(args: &SpliceArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_io().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("splice-proxy: listening on {}", args.listen))?;
        loop {
            let (mut client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => continue,
            };
            let upstream = args.upstream.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}
