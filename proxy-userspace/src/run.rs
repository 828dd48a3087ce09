//! `run`: the agent's main loop for the standalone source.
//!
//! Load the directory, translate, sync the difference; then wait for a change (batched:
//! syncs are at least `min_sync_period` apart) or the periodic re-sync. Input problems are
//! logged once each, naming the object, and never stop the loop.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use notify::Watcher;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::dataplane::{self, MapSizes};
use crate::manifests;
use crate::model::Skipped;
use crate::sync::Syncer;
use crate::translate::translate;

pub struct Config {
    pub manifests: PathBuf,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub node_name: String,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub map_sizes: MapSizes,
}

pub async fn run(config: Config) -> Result<()> {
    if !config.manifests.is_dir() {
        anyhow::bail!(
            "--manifests {} is not a directory",
            config.manifests.display()
        );
    }
    let (maps, _programs) = dataplane::start(&config.pin_dir, &config.cgroup, config.map_sizes)?;
    let mut syncer = Syncer::adopt(maps);
    tracing::info!(
        frontends = syncer.programmed().frontends.len(),
        backends = syncer.programmed().backends.len(),
        pin_path = %config.pin_dir.display(),
        cgroup = %config.cgroup.display(),
        node = %config.node_name,
        "datapath ready; adopted what was pinned"
    );

    // File events only say "something changed": the directory is re-read as a whole.
    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already holds a pending "changed".
            let _ = changed_tx.try_send(());
        }
    })
    .context("creating the file watcher")?;
    watcher
        .watch(&config.manifests, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", config.manifests.display()))?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut reported = BTreeSet::new();
    loop {
        let started = Instant::now();
        sync_once(&config, &mut syncer, &mut reported);
        tokio::select! {
            _ = changed_rx.recv() => {}
            _ = tokio::time::sleep(config.sync_period) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        // Bounded frequency: batch whatever else changes until the minimum period is over.
        sleep_until(started + config.min_sync_period).await;
        while changed_rx.try_recv().is_ok() {}
    }
    tracing::info!("stopping; programs and maps stay pinned and keep serving");
    Ok(())
}

fn sync_once(config: &Config, syncer: &mut Syncer, reported: &mut BTreeSet<Skipped>) {
    let (objects, mut skipped) = manifests::load_dir(&config.manifests);
    let translation = translate(&objects.services, &objects.slices, &config.node_name);
    skipped.extend(translation.skipped);
    report_skipped(reported, skipped.into_iter().collect());
    match syncer.sync(&translation.state) {
        Ok(stats) if stats.writes > 0 => tracing::info!(
            writes = stats.writes,
            frontends = stats.frontends,
            backends = stats.backends,
            "synced"
        ),
        Ok(_) => tracing::debug!("in sync"),
        Err(e) => tracing::error!("sync failed, retrying at the next change or period: {e:#}"),
    }
}

/// Logs each problem once while it lasts, and says when it is gone.
fn report_skipped(reported: &mut BTreeSet<Skipped>, current: BTreeSet<Skipped>) {
    for s in current.difference(reported) {
        tracing::error!("skipped {}: {}", s.object, s.reason);
    }
    for s in reported.difference(&current) {
        tracing::info!("no longer skipped: {}", s.object);
    }
    *reported = current;
}
