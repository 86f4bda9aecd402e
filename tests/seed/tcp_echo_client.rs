// From the seed tutorial, "Socket Programming in Rust" > TCP Echo > Client
use std::io::{Read, Write};
use std::net::TcpStream;

fn main() -> std::io::Result<()> {
    // create a socket and connect to a server.
    let mut stream = TcpStream::connect("127.0.0.1:50000")?;

    // send a message to the server.
    let msg = "hello world";
    stream.write(msg.as_bytes())?;

    // receive a message from the server.
    let mut buf = [0u8; 4096];
    stream.read(&mut buf)?;
    println!("{}", std::str::from_utf8(&buf).unwrap());

    Ok(())
}
