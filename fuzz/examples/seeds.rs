//! Writes the seed corpora under fuzz/corpus/TARGET/ from real inputs: the frames of
//! userspace/tests/data/frames.json, Ethernet frames built with etherparse (IPv4, IPv6, VLAN tags,
//! options, extension headers, fragments), requests as curl and browsers send them (pipelined and
//! malformed too), the shipped hw-profiles/*.toml, and the README's listen specs, CPU lists and
//! durations.
//!
//! Run from the repository root: `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.

use std::path::Path;

use etherparse::{
    ip_number, IpHeaders, Ipv4Header, Ipv6Extensions, Ipv6FlowLabel, Ipv6Header, Ipv6RawExtHeader,
    PacketBuilder, VlanId,
};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let corpus = root.join("fuzz/corpus");
    let seeds = [
        ("wire", wire(root)),
        ("frame", frames()),
        ("http", http()),
        ("profile", profiles(root)),
        ("spec", specs()),
    ];
    for (target, seeds) in seeds {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
        println!("{target}: {} seeds", seeds.len());
    }
}

type Seeds = Vec<(String, Vec<u8>)>;

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Every frame of frames.json, sockperf messages, and streams (first byte: 0 counter, 1 echo, 2
/// sockperf; the fuzz target reads it as the protocol and the seed of the read sizes).
fn wire(root: &Path) -> Seeds {
    let text = std::fs::read_to_string(root.join("userspace/tests/data/frames.json")).unwrap();
    let vectors: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut seeds = Seeds::new();
    let mut valid = Vec::new();
    for v in vectors["valid"].as_array().unwrap() {
        let frame = hex(v["frame_hex"].as_str().unwrap());
        seeds.push((
            format!("valid-{}", v["value"].as_str().unwrap()),
            frame.clone(),
        ));
        valid.push(frame);
    }
    for (i, v) in vectors["invalid"].as_array().unwrap().iter().enumerate() {
        seeds.push((
            format!("invalid-{i}"),
            hex(v["frame_hex"].as_str().unwrap()),
        ));
    }
    let ping = hex("00000000000000010003000000109a66");
    seeds.push(("sockperf-ping".into(), ping.clone()));
    let mut long = hex("0000000000000002000300000040");
    long.resize(64, 0xa5);
    seeds.push(("sockperf-64".into(), long.clone()));
    let stream = |selector: u8, parts: &[&[u8]]| {
        let mut s = vec![selector];
        parts.iter().for_each(|p| s.extend_from_slice(p));
        s
    };
    seeds.push((
        "stream-counter".into(),
        stream(0, &[&valid[1], &valid[5], &valid[0]]),
    ));
    seeds.push((
        "stream-counter-bad".into(),
        stream(3, &[&valid[2], b"aaaaaaaaaaaaaaaa"]),
    ));
    seeds.push(("stream-echo".into(), stream(1, &[b"hello, ricochet"])));
    seeds.push(("stream-sockperf".into(), stream(2, &[&ping, &long, &ping])));
    seeds
}

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT4: [u8; 4] = [198, 18, 0, 2];
const SERVER4: [u8; 4] = [198, 18, 0, 1];
const CLIENT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SERVER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn write(builder: etherparse::PacketBuilderStep<etherparse::UdpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

fn ipv6(extensions: Ipv6Extensions) -> IpHeaders {
    let header = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: 0,
        next_header: ip_number::UDP,
        hop_limit: 64,
        source: CLIENT6,
        destination: SERVER6,
    };
    IpHeaders::Ipv6(header, extensions)
}

/// Ethernet frames as the AF_XDP worker receives them, and some it must refuse.
fn frames() -> Seeds {
    let counter = hex("000000000000002a6de6f5d076d742b9");
    let ping = hex("00000000000000010003000000109a66");
    let eth = || PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC);
    let vlan = |id| VlanId::try_new(id).unwrap();
    let mut seeds = Seeds::new();
    let mut add = |name: &str, bytes: Vec<u8>| seeds.push((name.to_string(), bytes));
    add(
        "ipv4-counter",
        write(eth().ipv4(CLIENT4, SERVER4, 64).udp(40000, 7777), &counter),
    );
    add(
        "ipv4-sockperf",
        write(eth().ipv4(CLIENT4, SERVER4, 64).udp(40001, 11111), &ping),
    );
    add(
        "ipv4-echo-1472",
        write(
            eth().ipv4(CLIENT4, SERVER4, 64).udp(40002, 7000),
            &[0x5a; 1472],
        ),
    );
    add(
        "ipv4-source-port-0",
        write(eth().ipv4(CLIENT4, SERVER4, 64).udp(0, 7777), &counter),
    );
    add(
        "ipv6-counter",
        write(eth().ipv6(CLIENT6, SERVER6, 64).udp(40000, 7777), &counter),
    );
    add(
        "vlan-ipv4-counter",
        write(
            eth()
                .single_vlan(vlan(42))
                .ipv4(CLIENT4, SERVER4, 64)
                .udp(40000, 7777),
            &counter,
        ),
    );
    add(
        "qinq-ipv6-sockperf",
        write(
            eth()
                .double_vlan(vlan(100), vlan(42))
                .ipv6(CLIENT6, SERVER6, 64)
                .udp(40000, 11111),
            &ping,
        ),
    );
    let mut options = Ipv4Header::new(0, 64, ip_number::UDP, CLIENT4, SERVER4).unwrap();
    options.options = etherparse::Ipv4Options::try_from(&[1u8, 1, 1, 1][..]).unwrap();
    add(
        "ipv4-options",
        write(
            eth()
                .ip(IpHeaders::Ipv4(options, Default::default()))
                .udp(40000, 7777),
            &counter,
        ),
    );
    let mut fragment = Ipv4Header::new(0, 64, ip_number::UDP, CLIENT4, SERVER4).unwrap();
    fragment.more_fragments = true;
    add(
        "ipv4-first-fragment",
        write(
            eth()
                .ip(IpHeaders::Ipv4(fragment, Default::default()))
                .udp(40000, 7777),
            &counter,
        ),
    );
    let hop_by_hop = Ipv6RawExtHeader::new_raw(ip_number::UDP, &[1, 4, 0, 0, 0, 0]).unwrap();
    let extensions = Ipv6Extensions {
        hop_by_hop_options: Some(hop_by_hop),
        ..Default::default()
    };
    add(
        "ipv6-hop-by-hop",
        write(eth().ip(ipv6(extensions)).udp(40000, 7777), &counter),
    );
    let mut padded = write(eth().ipv4(CLIENT4, SERVER4, 64).udp(40000, 7777), &counter);
    padded.resize(60.max(padded.len()), 0);
    padded.extend_from_slice(&[0; 4]);
    add("ipv4-trailing-bytes", padded);
    let mut tcp = Vec::new();
    eth()
        .ipv4(CLIENT4, SERVER4, 64)
        .tcp(40000, 7777, 1, 65535)
        .write(&mut tcp, &counter)
        .unwrap();
    add("ipv4-tcp", tcp);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT4);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&SERVER4);
    add("arp", arp);
    let whole = write(eth().ipv4(CLIENT4, SERVER4, 64).udp(40000, 7777), &counter);
    add("ipv4-truncated", whole[..whole.len() - 5].to_vec());
    seeds
}

/// Requests as curl, browsers and load generators send them, and ones the parser must refuse.
fn http() -> Seeds {
    let requests: &[(&str, &str)] = &[
        ("curl-get-counter", "GET /counter HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"),
        ("curl-post-json", "POST /counter HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"increment\": 5}"),
        ("post-json-bad", "POST /counter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"increment\": -5.5e9}"),
        ("healthz-http10", "GET /healthz HTTP/1.0\r\n\r\n"),
        ("http10-keep-alive", "GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        ("pipelined", "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /stats HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n\r\n"),
        ("browser-dashboard", "GET / HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: text/html,application/xhtml+xml\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n\r\n"),
        ("head", "HEAD /counter HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("wrong-method", "DELETE /counter HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("pprof-bad-seconds", "GET /debug/pprof/profile?seconds=0&format=flamegraph HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("pprof-bearer", "GET /debug/pprof/profile?seconds=61 HTTP/1.1\r\nAuthorization: Bearer secret\r\n\r\n"),
        ("unknown-path", "GET /nope?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("conflicting-content-length", "GET /counter HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\nGET /"),
        ("signed-content-length", "POST /counter HTTP/1.1\r\nContent-Length: +15\r\n\r\n"),
        ("chunked", "POST /counter HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ("body-too-large", "POST /counter HTTP/1.1\r\nContent-Length: 70000\r\n\r\n"),
        ("partial-head", "GET /counter HTTP/1.1\r\nHost: 127.0.0.1"),
        ("no-version", "GET /counter\r\n\r\n"),
        ("bad-header", "GET / HTTP/1.1\r\nHo st: x\r\n\r\n"),
    ];
    let mut seeds: Seeds = requests
        .iter()
        .map(|(name, text)| (name.to_string(), text.as_bytes().to_vec()))
        .collect();
    let mut frame = b"POST /counter HTTP/1.1\r\nContent-Type: application/octet-stream\r\nContent-Length: 16\r\n\r\n".to_vec();
    frame.extend_from_slice(&hex("000000000000002a6de6f5d076d742b9"));
    seeds.push(("post-frame".into(), frame));
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many.extend_from_slice(format!("X-Header-{i}: {i}\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    seeds.push(("too-many-headers".into(), many));
    seeds
}

/// The shipped profiles, and IRQ names with the interface they are matched against (NUL between).
fn profiles(root: &Path) -> Seeds {
    let mut seeds = Seeds::new();
    let mut paths: Vec<_> = std::fs::read_dir(root.join("hw-profiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        seeds.push((name, std::fs::read(&path).unwrap()));
    }
    for (i, irq) in [
        "ice-eth0-TxRx-3\0eth0",
        "eth10-TxRx-0\0eth1",
        "i40e-eth1-TxRx-2\0eth1",
        "mlx5_comp3@pci:0000:08:00.0\0enp65s0f0np0",
        "virtio0-input.0\0eth0",
    ]
    .iter()
    .enumerate()
    {
        seeds.push((format!("irq-{i}"), irq.as_bytes().to_vec()));
    }
    seeds
}

/// The README's listen specs, CPU lists and durations, and mistakes people make.
fn specs() -> Seeds {
    [
        "udp://0.0.0.0:7777",
        "tcp://0.0.0.0:7777",
        "unix:///run/ricochet.sock",
        "sockperf+udp://0.0.0.0:11111",
        "echo+tcp://[::1]:7000",
        "counter+udp://198.18.0.1:7777",
        "udp://[fe80::1%2]:7777",
        "udp://0.0.0.0",
        "http://0.0.0.0:80",
        "0-3,6",
        "0,1",
        "0-3,6,8-9",
        "3-1",
        "1,1",
        "10s",
        "150us",
        "2.5s",
        "7d",
        "1e9d",
        "18446744073709551615s",
    ]
    .iter()
    .enumerate()
    .map(|(i, s)| (format!("{i:02}"), s.as_bytes().to_vec()))
    .collect()
}
