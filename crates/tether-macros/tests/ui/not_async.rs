#[tether_macros::interface]
trait Calculator {
    fn divide(&self, a: f64, b: f64) -> Result<f64, tether::RemoteError>;
}

fn main() {}
