"""AI Media Maker: a self-hosted appliance that generates images in bulk. See ARCHITECTURE.md."""
