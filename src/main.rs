use std::process::ExitCode;

use anyhow::Context as _;
use channel_assignment::{
    MIGRATOR, auth,
    config::{Cli, Command},
    dev, startup,
    store::{
        database::Database,
        privileges::{self, Granted},
    },
    telemetry,
};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                // Inside the runtime: the span exporter runs on it.
                let telemetry =
                    telemetry::init(cli.command.log_format(), cli.command.otlp_endpoint())?;
                let outcome = run(cli.command).await;
                telemetry.shutdown();
                outcome
            })
        });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, with its causes, for operators and for `kubectl logs`.
            eprintln!("channel-assignment: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(settings) => {
            let url = required_database_url(settings.database_url.as_deref())?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(settings.database_acquire_timeout)
                .connect(url)
                .await
                .context("cannot connect to the database")?;
            MIGRATOR.run(&pool).await.context("migration failed")?;
            tracing::info!("migrations applied");
            if let Some(role) = settings.app_role.as_deref() {
                let granted = privileges::grant_to(&pool, role)
                    .await
                    .with_context(|| format!("cannot grant {role:?} its privileges"))?;
                match granted {
                    Granted::Granted => {
                        tracing::info!(role, "privileges granted to the serving role")
                    }
                    Granted::SameRole => tracing::info!(
                        role,
                        "the serving role is the migrating role: it owns the tables, nothing to grant"
                    ),
                }
            }
            Ok(())
        }
        Command::Serve(settings) => {
            let url = required_database_url(settings.database.database_url.as_deref())?;
            let options = startup::connect_options(url, settings.request_timeout)?;
            let database = Database::new(options, &settings.database)?;
            let application = startup::Application::build(settings, database).await?;
            application.run(shutdown_signal()).await
        }
        Command::Dev(settings) => dev::run(settings, shutdown_signal()).await,
        Command::Token(settings) => {
            let minted = auth::token_command(&settings)?;
            for warning in minted.warnings {
                eprintln!("channel-assignment: warning: {warning}");
            }
            println!("{}", minted.token);
            Ok(())
        }
    }
}

fn required_database_url(database_url: Option<&str>) -> anyhow::Result<&str> {
    database_url.context("DATABASE_URL (or --database-url) is required")
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = terminate => tracing::info!("received SIGTERM"),
        () = interrupt => tracing::info!("received SIGINT"),
    }
}
