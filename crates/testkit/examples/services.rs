//! Start (or find) the local PostgreSQL cluster and Kafka broker the tests use, create a fresh
//! database, and print shell exports for them: `eval "$(cargo run -q -p workflow-testkit
//! --example services)"`. The services keep running after this exits (scripts/distributed.sh).

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let database_url = workflow_testkit::postgres_url().await?;
    let bootstrap = workflow_testkit::kafka_bootstrap().await?;
    println!("export DATABASE_URL='{database_url}'");
    println!("export KAFKA_BOOTSTRAP_SERVERS='{bootstrap}'");
    Ok(())
}
