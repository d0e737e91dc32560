#[tether_macros::interface]
trait Chat {
    #[tether(connection)]
    async fn send(&self) -> Result<(), tether::RemoteError>;
}

fn main() {}
