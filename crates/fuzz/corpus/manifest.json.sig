{
  "signatures": [
    {
      "keyid": "b62e867fa2f33afe",
      "sig": "a2a8aa57c2a690e188b7986addaf6532acdded988329c7c17fcf9082733f61dd4ebe95e336f0003c2bc4e63a3897a2134a5b58405a4ce9dc18d6ee328146080e"
    }
  ]
}
