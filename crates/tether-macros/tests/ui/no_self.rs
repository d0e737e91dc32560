#[tether_macros::interface]
trait Calculator {
    async fn divide(a: f64, b: f64) -> Result<f64, tether::RemoteError>;
}

fn main() {}
