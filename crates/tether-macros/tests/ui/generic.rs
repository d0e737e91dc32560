#[tether_macros::interface]
trait Echo {
    async fn echo<T>(&self, x: T) -> Result<T, tether::RemoteError>;
}

fn main() {}
